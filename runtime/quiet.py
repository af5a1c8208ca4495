"""Silence the import-time noise solc's dependencies print, unless SOLC_VERBOSE=1.

Importing transformers imports torchao, which logs a "Failed to load ...so" warning per optional CUDA
extension this machine cannot load, and registers two Enum pytree constants that torch logs as
deprecated. None of it concerns a solc user; a new user reads it as breakage. Only those messages
are dropped (a logging.Filter on the two loggers), every other warning still shows. Imported first by
`solc`, before anything imports torchao.
"""
from __future__ import annotations

import logging
import os

_NOISE = {
    "torchao": ("Failed to load ",),
    "torch.utils._pytree": ("is an Enum subclass and is now natively supported",),
}


def verbose() -> bool:
    return os.environ.get("SOLC_VERBOSE", "") not in ("", "0")


class _DropNoise(logging.Filter):
    def __init__(self, fragments: tuple[str, ...]):
        super().__init__()
        self.fragments = fragments

    def filter(self, record: logging.LogRecord) -> bool:
        message = str(record.msg)
        return not any(f in message for f in self.fragments)


def install() -> None:
    if verbose():
        return
    for name, fragments in _NOISE.items():
        logger = logging.getLogger(name)
        if not any(isinstance(f, _DropNoise) for f in logger.filters):
            logger.addFilter(_DropNoise(fragments))


install()
