"""Builds the CPU kernels of a git revision (or the working tree) into a library of its own, for the A/B
benchmarks (attention_ab.py, int4_ab.py): two versions of a kernel, loaded side by side in one process."""
from __future__ import annotations

import ctypes
import json
import subprocess
from pathlib import Path

from runtime.ops import cpu_linear

ROOT = Path(__file__).resolve().parent.parent
HEADERS = ("cpu_bf16.h", "cpu_fixed_order.h", "cpu_select.h")


def source(rev: str | None, path: str) -> str:
    """The text of `path` at git revision `rev` (None: the working tree); ValueError where git has none."""
    if rev is None:
        return (ROOT / path).read_text()
    shown = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:{path}"], capture_output=True, text=True)
    if shown.returncode:
        raise ValueError(f"git show {rev}:{path} failed: {shown.stderr.strip()}")
    return shown.stdout


def build(rev: str | None, out_dir: Path, name: str, sources: tuple[str, ...], functions: tuple[str, ...]) -> ctypes.CDLL:
    """Compile runtime/ops/`sources` of revision `rev` (with the headers that revision has) with the
    project's flags into out_dir/name.so; `functions` get cpu_linear's signatures."""
    src = out_dir / name
    src.mkdir(parents=True, exist_ok=True)
    for f in sources + HEADERS:
        try:
            text = source(rev, f"runtime/ops/{f}")
        except ValueError:
            if f in HEADERS:
                continue  # a header this revision did not have yet
            raise
        (src / f).write_text(text)
    lib_path = out_dir / f"{name}.so"
    subprocess.run(["cc", *cpu_linear.CFLAGS, *(str(src / f) for f in sources), "-o", str(lib_path), "-lm"], check=True)
    lib = ctypes.CDLL(str(lib_path))
    for fn in functions:
        getattr(lib, fn).argtypes = cpu_linear.SIGNATURES[fn]
        getattr(lib, fn).restype = cpu_linear.RESTYPES.get(fn)
    return lib


def build_pair(parser, base: str, head: str | None, out_dir: Path, build) -> dict:
    """{"base": lib, "head": lib}: build(rev, out_dir, name) for both revisions; a revision git cannot
    show is parser.error naming the option."""
    libs = {}
    for name, rev in (("base", base), ("head", head)):
        try:
            libs[name] = build(rev, out_dir, name)
        except ValueError as e:
            parser.error(f"--{name}={rev!r} is invalid: {e}")
    return libs


def write_json(out: str | None, stem: str, tag: str, result: dict) -> None:
    """The A/B's result as out/stem[_tag].json (nothing without --out)."""
    if out:
        path = Path(out) / f"{stem}{'_' + tag if tag else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(result, indent=1))
        print(f"written {path}")
