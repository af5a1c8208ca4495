"""Exceptions users can catch; re-exported from `solc`."""


class SolcError(Exception):
    """Base class of every error solc raises on purpose."""


class UnsupportedModelError(SolcError):
    """The base model's graph lacks a site a pass needs (names the module and what was expected)."""


class AssetError(SolcError):
    """A model or data file is missing, corrupt or unknown; the message says how to fix it."""


class ArgumentError(SolcError, ValueError):
    """An argument's value is outside what is valid. `argument` names it; the message also gives the
    value and the valid range. A ValueError too, so `except ValueError` callers keep working."""

    def __init__(self, argument: str, message: str):
        super().__init__(message)
        self.argument = argument


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument has the wrong type (e.g. a string where a number is expected)."""
