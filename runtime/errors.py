"""Exceptions users can catch; re-exported from `solc`."""


class SolcError(Exception):
    """Base class of every error solc raises on purpose."""


class UnsupportedModelError(SolcError):
    """The base model's graph lacks a site a pass needs (names the module and what was expected)."""


class AssetError(SolcError):
    """A model or data file is missing, corrupt or unknown; the message says how to fix it."""
