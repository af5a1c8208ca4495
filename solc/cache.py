"""The asset cache (where converted models, corpora and tokenised contexts live, never in git) and
solc's one way of writing files and directories atomically.

Root: $SOLC_CACHE, default ~/.cache/solc. Every entry is written atomically: built in a temporary
sibling named `.<name>.solc-tmp-<pid>-<random>`, then renamed into place, so a reader sees the old
entry or the new one, never half of one. A directory that already exists is swapped with the new one
in one renameat2(RENAME_EXCHANGE) where the OS has it; elsewhere it is moved aside to
`.<name>.solc-old` first, and `recover_directory` puts it back if a crash fell between the two
renames. Temporaries of a process that died are removed the next time the same target is written.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import os
import re
import secrets
import shutil
from pathlib import Path
from typing import Callable

TMP_TAG, OLD_TAG = ".solc-tmp-", ".solc-old"


def cache_root() -> Path:
    return Path(os.environ.get("SOLC_CACHE") or Path.home() / ".cache" / "solc")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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


def check_replaceable_result(target: Path, command: str, argument: str) -> None:
    """A results file a script may write over: absent, or a JSON file whose recorded command (top level
    or under "meta") starts with `command`, i.e. an earlier result of the same script. Anything else at
    that path is the user's, and is refused with an ArgumentError naming `argument` (left as it is)."""
    import json

    from runtime.errors import ArgumentError

    target = Path(target)
    if not os.path.lexists(target):
        return
    try:
        found = json.loads(target.read_text())
        recorded = found.get("command") or found.get("meta", {}).get("command", "")
    except (OSError, ValueError, AttributeError):
        recorded = ""
    if not (isinstance(recorded, str) and recorded.startswith(command)):
        raise ArgumentError(argument, f"{argument} {str(target)!r} exists and is not a result of `{command}`; "
                                      "it is left as it is: pass a new path")


def atomic_write_bytes(target: Path, data: bytes) -> None:
    atomic_write(target, lambda f: f.write(data))


def atomic_torch_save(obj, target: Path) -> None:
    import torch

    atomic_write(target, lambda f: torch.save(obj, f))


# -- directories -----------------------------------------------------------------------------------
_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic rename (Linux renameat2); False where the OS cannot."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def old_sibling(target: Path) -> Path:
    return target.parent / f".{target.name}{OLD_TAG}"


def recover_directory(target: Path, complete: Callable[[Path], bool] = lambda p: True) -> None:
    """After a crash between the two renames of the fallback swap, `target` is missing and the old
    copy sits at `.<name>.solc-old`: move it back (if `complete` accepts it)."""
    target = Path(target)
    old = old_sibling(target)
    if not os.path.lexists(target) and old.is_dir() and complete(old):
        os.rename(old, target)


def replace_directory(tmp: Path, target: Path) -> None:
    """Make the finished directory `tmp` be `target`; an existing `target` is swapped out atomically
    and then removed (its contents were checked by the caller)."""
    if not os.path.lexists(target):
        os.rename(tmp, target)
    elif target.is_dir() and not any(target.iterdir()):
        os.rename(tmp, target)  # replaces an empty directory atomically
    elif _exchange(tmp, target):
        shutil.rmtree(tmp)  # now the old contents
    else:
        old = old_sibling(target)
        if os.path.lexists(old):
            shutil.rmtree(old)
        os.rename(target, old)
        os.rename(tmp, target)  # a crash just before this is undone by recover_directory
        shutil.rmtree(old)


def make_directory(path: Path) -> Path:
    """mkdir with the usual mode (0777 less the umask; tempfile.mkdtemp would give 0700)."""
    os.mkdir(path, 0o777)
    return path


@contextlib.contextmanager
def atomic_directory(target: Path):
    """Yield a temporary directory; on success it replaces `target` atomically."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = make_directory(temp_sibling(target))
    try:
        yield tmp
        replace_directory(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
