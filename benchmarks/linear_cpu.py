"""What batch invariance costs: a dense decode step with solc's batch-invariant linear vs MKL's F.linear.

    python -m benchmarks.linear_cpu --threads 1 2 --batch 1 16 --out benchmarks/results/linear_cpu.json

One compiled SmolLM2-135M (real weights, fp32), a --context-token prefill, then dense decode steps. Two
variants, interleaved round by round in one process: "invariant" (runtime.ops.cpu_linear's fixed-order
kernel for every decode-row linear: attention projections, LM head, the MLP's dense projections) and
"mkl" (the same graph with that kernel swapped for F.linear, which is what solc ran before and is NOT
batch invariant). The table shows medians and the ratio invariant / mkl. Speed is never asserted by a
test: this script is the check.
"""
from __future__ import annotations

import os
os.environ.setdefault("SOLC_CPU_FAST", "1")
import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import solc
from runtime.errors import ArgumentError
from runtime.ops import cpu_linear
from solc.cache import atomic_write_bytes
from training.cli import check_result_path


def _mkl_rows(x, w, b):
    return F.linear(x, w, b)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--context", type=int, default=512)
    p.add_argument("--steps", type=int, default=5, help="timed decode steps per variant and round")
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--out", default="benchmarks/results/linear_cpu.json")
    args = p.parse_args(argv)
    for option, values in (("--threads", args.threads), ("--batch", args.batch), ("--context", [args.context]),
                           ("--steps", [args.steps]), ("--rounds", [args.rounds])):
        if min(values) < 1:
            p.error(f"{option}={' '.join(map(str, values))} is invalid: expected integers >= 1")
    check_result_path(p, args.out, "python -m benchmarks.linear_cpu", "--out")
    command = "python -m benchmarks.linear_cpu " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    model = solc.load_model("smollm2-135m", dtype=torch.float32)
    try:
        sol = solc.compile(model, max_seq_len=args.context + 8)
    except ArgumentError as e:
        if e.argument != "max_seq_len":
            raise
        p.error(f"--context={args.context} is invalid: the model's positions must hold it + 8 ({e})")
    kernel_rows = cpu_linear.rows_linear
    rows = []
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            for batch in args.batch:
                cache = sol.new_cache(batch, args.context + 8)
                ids = torch.randint(3, 1000, (batch, args.context + 1), generator=torch.Generator().manual_seed(0))
                with torch.no_grad():
                    sol(ids[:, :args.context], None, torch.arange(args.context).expand(batch, -1), cache)
                    token, pos = ids[:, args.context:], torch.full((batch, 1), args.context)
                    times = {"invariant": [], "mkl": []}
                    for _ in range(args.rounds):
                        for name in times:
                            cpu_linear.rows_linear = kernel_rows if name == "invariant" else _mkl_rows
                            sol(token, None, pos, cache)  # warm: the variant's first step
                            t = time.perf_counter()
                            for _ in range(args.steps):
                                sol(token, None, pos, cache)
                            times[name].append((time.perf_counter() - t) / args.steps * 1e3)
                inv, mkl = statistics.median(times["invariant"]), statistics.median(times["mkl"])
                rows.append({"threads": threads, "batch": batch, "context": args.context, "invariant_ms": inv,
                             "mkl_ms": mkl, "ratio": inv / mkl, "rounds_ms": times})
                print(f"threads {threads}  batch {batch:3d}  invariant {inv:8.2f} ms  mkl {mkl:8.2f} ms  "
                      f"invariant / mkl {inv / mkl:.3f}", flush=True)
    finally:
        cpu_linear.rows_linear = kernel_rows
    out = Path(args.out)
    atomic_write_bytes(out, (json.dumps({"command": command, "model": "smollm2-135m (pretrained, fp32)",
                                         "torch": torch.__version__, "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                                         "load_average": os.getloadavg(), "rows": rows}, indent=2) + "\n").encode())
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
