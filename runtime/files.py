"""Writing files atomically, the one way solc does it (the runtime's own files, e.g. a saved policy, and
solc.cache's entries): the content goes to a temporary sibling named `.<name>.solc-tmp-<pid>-<random>`,
then a rename puts it in place, so a reader sees the old file or the new one, never half of one.
Temporaries of a process that died are removed the next time the same target is written."""
from __future__ import annotations

import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

TMP_TAG = ".solc-tmp-"


def cache_root() -> Path:
    """Where solc keeps what it builds or fetches (assets, compiled C kernels): $SOLC_CACHE, default
    ~/.cache/solc. Here, not in solc.cache, because the runtime's kernels need it too."""
    return Path(os.environ.get("SOLC_CACHE") or Path.home() / ".cache" / "solc")


# -- temporaries -----------------------------------------------------------------------------------
def temp_sibling(target: Path) -> Path:
    """A fresh name next to `target` for building its replacement (nothing is created)."""
    return target.parent / f".{target.name}{TMP_TAG}{os.getpid()}-{secrets.token_hex(4)}"


def pid_alive(pid: int) -> bool:
    """Whether process `pid` still runs (a temporary it owns may still be written)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the temporaries of `target` left by processes that no longer run (a kill mid-write)."""
    target = Path(target)
    pattern = re.compile(re.escape(f".{target.name}{TMP_TAG}") + r"(\d+)-[0-9a-f]+$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for entry in target.parent.iterdir():
        m = pattern.match(entry.name)
        if m and not pid_alive(int(m.group(1))):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
            removed.append(entry)
    return removed


# -- files -----------------------------------------------------------------------------------------
def atomic_write(target: Path, write: Callable, fsync: bool = True) -> None:
    """Call write(binary file) on a temporary sibling, then rename it over `target` (mode per umask)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = temp_sibling(target)
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as f:
            write(f)
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        if os.path.lexists(tmp):
            os.unlink(tmp)


def atomic_write_bytes(target: Path, data: bytes) -> None:
    atomic_write(target, lambda f: f.write(data))


def atomic_torch_save(obj, target: Path) -> None:
    import torch

    atomic_write(target, lambda f: torch.save(obj, f))
