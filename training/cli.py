"""What the command-line entry points share: the command that reproduces a run, its JSON record, and the
progress file an interrupted evaluation resumes from."""
from __future__ import annotations

import hashlib
import json
import shlex
import sys
from pathlib import Path

from runtime.errors import ArgumentError
from solc.cache import atomic_torch_save, atomic_write_bytes


def command_line(module: str, argv=None) -> str:
    """`python -m <module> <args>` as typed (argv, or this process's arguments)."""
    return f"python -m {module} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))


def check_result_path(parser, path, command: str, argument: str = "--out") -> None:
    """solc.cache.check_replaceable_result for a command line: a file at `path` that is not an earlier
    result of `command` ends the tool through parser.error (one line naming `argument`, exit 2)."""
    from solc.cache import check_replaceable_result

    try:
        check_replaceable_result(Path(path), command, argument)
    except ArgumentError as e:
        parser.error(str(e))


def write_json(path, record: dict) -> None:
    """The record as indented JSON, written atomically (an interrupted write leaves the old file)."""
    atomic_write_bytes(Path(path), (json.dumps(record, indent=2) + "\n").encode())


def fingerprint(options, tensors) -> str:
    """One hash of what a computation's results depend on: `options` (by repr) and the bytes of each
    tensor (any dtype, any device)."""
    import torch

    h = hashlib.sha256(repr(options).encode())
    for t in tensors:
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


PROGRESS_KIND = "solc evaluation progress"


class ProgressFile:
    """The finished parts of a long evaluation, saved to `path` as they finish (written whole, then
    renamed), so that the same evaluation rerun after an interrupt skips them and gives the same results.
    A file from another evaluation (another `fingerprint`) is started over; a file at `path` that solc did
    not write is refused (ArgumentError naming `argument`), never overwritten or removed. No path: nothing
    is saved. `finish` removes the file once the evaluation is complete."""

    def __init__(self, path: Path | None, fingerprint: str, argument: str, name: str):
        import torch

        self.path, self.state = path, {"kind": PROGRESS_KIND, "fingerprint": fingerprint}
        if path is None or not path.exists():
            return
        try:
            saved = torch.load(path, weights_only=True)
        except Exception:
            saved = None
        if not isinstance(saved, dict) or saved.get("kind") != PROGRESS_KIND:
            raise ArgumentError(argument, f"{argument}: {path} exists and is not an evaluation progress file solc "
                                          "wrote; move it away or choose another place")
        if saved.get("fingerprint") == fingerprint:
            self.state = saved
            done = ", ".join(k for k in saved if k not in ("kind", "fingerprint"))
            print(f"{name}: resuming from {path} ({done or 'nothing'} done)", file=sys.stderr, flush=True)
        else:
            print(f"{name}: {path} holds another evaluation's progress; starting over", file=sys.stderr, flush=True)

    def get(self, key: str):
        return self.state.get(key)

    def put(self, key: str, value) -> None:
        self.state[key] = value
        if self.path is not None:
            atomic_torch_save(self.state, self.path)

    def finish(self) -> None:
        if self.path is not None:
            self.path.unlink(missing_ok=True)
