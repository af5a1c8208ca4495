"""What the command-line entry points share: the command that reproduces a run, and its JSON record."""
from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

from solc.cache import atomic_write_bytes


def command_line(module: str, argv=None) -> str:
    """`python -m <module> <args>` as typed (argv, or this process's arguments)."""
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def write_json(path, record: dict) -> None:
    """The record as indented JSON, written atomically (an interrupted write leaves the old file)."""
    atomic_write_bytes(Path(path), (json.dumps(record, indent=2) + "\n").encode())


def digest_tensors(h, tensors) -> None:
    """Feed the bytes of each tensor (any dtype, any device) to the hash `h` (a resume file's fingerprint)."""
    import torch

    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
