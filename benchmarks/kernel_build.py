"""Builds the CPU kernels of a git revision (or the working tree) into a library of its own, for the A/B
benchmarks (attention_ab.py, int4_ab.py): two versions of a kernel, loaded side by side in one process."""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import shlex
import statistics
import subprocess
import sys
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


def check_json(parser: argparse.ArgumentParser, out: str | None, stem: str, tag: str, script: str) -> None:
    """Before measuring: --out is a folder (or not there yet), and out/stem[_tag].json is absent or an
    earlier result of benchmarks/`script`; anything else is the user's and is refused (left as it is)."""
    if out:
        import bench_cli

        bench_cli.check_outputs(parser, Path(out), f"{stem}{'_' + tag if tag else ''}", script, suffixes=(".json",))


def write_json(out: str | None, stem: str, tag: str, result: dict) -> None:
    """The A/B's result as out/stem[_tag].json (nothing without --out), written whole or not at all."""
    if out:
        from solc.cache import atomic_write_bytes

        path = Path(out) / f"{stem}{'_' + tag if tag else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(path, json.dumps(result, indent=1).encode())
        print(f"written {path}")


def by_turns(libs: dict, threads: list[int], row_counts: list[int], rounds: int, run) -> dict:
    """{(name, threads, rows): [ms, ...]}: run(name, lib, threads, rows) -> ms for every version, thread count
    and row count by turns, round after round (round 0 warms up and is dropped)."""
    samples = {(name, t, r): [] for name in libs for t in threads for r in row_counts}
    for rnd in range(rounds + 1):
        for t in threads:
            for r in row_counts:
                for name, lib in libs.items():
                    ms = run(name, lib, t, r)
                    if rnd:
                        samples[(name, t, r)].append(ms)
    return samples


def timing_row(samples: dict, t: int, r: int) -> dict:
    """One table row's timings: medians of base and head, head / base, and every round."""
    base, head = (statistics.median(samples[(n, t, r)]) for n in ("base", "head"))
    return {"threads": t, "rows": r, "base_ms": round(base, 3), "head_ms": round(head, 3),
            "head_over_base": round(head / base, 3),
            "base_rounds": [round(v, 3) for v in samples[("base", t, r)]],
            "head_rounds": [round(v, 3) for v in samples[("head", t, r)]]}


def ab_parser(doc: str, rounds: int, revisions: bool = True) -> argparse.ArgumentParser:
    """The options every A/B script takes (--base, --head, --threads, --rounds, --out, --tag); the script
    adds its own. revisions=False: no --base / --head (an A/B of one build on two inputs)."""
    p = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    if revisions:
        p.add_argument("--base", required=True, help="git revision of the base version")
        p.add_argument("--head", default=None, help="git revision of the head version (default: the working tree)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=rounds)
    p.add_argument("--out", default=None, help="folder for the JSON (default: print only)")
    p.add_argument("--tag", default="", help="suffix of the JSON's name")
    return p


def ab_args(p: argparse.ArgumentParser, script: str, argv) -> tuple:
    """(args, the command line as run, the thread counts), after checking the shared options."""
    args = p.parse_args(argv)
    command = f"python benchmarks/{script} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    threads = list_arg(p, "--threads", args.threads, int, lambda t: t >= 1, "integers >= 1")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} is invalid: expected an integer >= 1")
    return args, command, threads


def list_arg(parser: argparse.ArgumentParser, flag: str, text: str, convert, ok, valid: str) -> list:
    """A comma-separated option's values, or parser.error naming the option and what is valid."""
    try:
        values = [convert(x) for x in text.split(",")]
    except ValueError:
        values = []
    if not values or not all(ok(v) for v in values):
        parser.error(f"{flag}={text!r} is invalid: expected {valid}")
    return values


def print_table(title: str, rows: list[dict], extra: tuple = ()) -> None:
    """The A/B table: threads, rows, medians, head / base, then each (header, key, format) of `extra`."""
    print(title)
    print(f"{'threads':>7} {'rows':>4} {'base ms':>8} {'head ms':>8} {'head/base':>9}" + "".join(f" {h:>9}" for h, _, _ in extra))
    for row in rows:
        print(f"{row['threads']:>7} {row['rows']:>4} {row['base_ms']:>8.3f} {row['head_ms']:>8.3f} {row['head_over_base']:>9.3f}"
              + "".join(f" {format(row[k], f):>9}" for _, k, f in extra))
