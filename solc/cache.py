"""The asset cache (where converted models, corpora and tokenised contexts live, never in git) and
solc's one way of writing directories atomically (files: runtime/files.py, re-exported here).

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
import shutil
from pathlib import Path
from typing import Callable

from runtime.files import (  # noqa: F401  (re-exported: solc.cache is where callers above runtime/ find them)
    TMP_TAG, atomic_torch_save, atomic_write, atomic_write_bytes, cache_root, pid_alive, remove_stale_temporaries,
    temp_sibling)

OLD_TAG = ".solc-old"


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


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
