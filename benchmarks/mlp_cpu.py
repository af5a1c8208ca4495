"""CPU cost of solc::mlp per action vs the dense MLP, and of a whole decode step (SmolLM2-135M, fp32).

    python -m benchmarks.mlp_cpu --threads 1 2 --out benchmarks/results/mlp_cpu.json

Part 1 (op): one MLP site of SmolLM2-135M with its real weights (layer --layer) and the copies the
compile pass makes; every weight-mode action (mlp keep x bits) at batch 1, and batch 16 with mixed rows,
timed through torch.ops.solc.mlp with the step's hints set, as a dispatcher variant calls it.
Part 2 (step, --step): a whole decode step of the compiled model at --context tokens, batch 1, for a few
uniform actions. Variants are interleaved round by round in one process; the table shows medians and
ratios to dense in the same run. Speed is never asserted by a test: this script is the check.
"""
from __future__ import annotations

import os
os.environ.setdefault("SOLC_CPU_FAST", "1")  # measure the CPU fast paths (on by default; SOLC_CPU_FAST=0 turns them off)
import argparse
import json
import shlex
import statistics
import sys
import time
from pathlib import Path

import torch

import solc
from runtime.errors import ArgumentError
from runtime.ops import mlp_weights
from runtime.ops.quant_primitives import int4_group_size
from runtime.ops.step_hints import StepHints, step_hints
from solc.cache import atomic_write_bytes
from training.cli import check_result_path

KEEPS, BITS = (1.0, 0.8, 0.4), (16, 8, 4)


def _time(fn, rounds: int, inner: int) -> list[float]:
    return [fn(inner) for _ in range(rounds)]


def _timer(call):
    def run(inner: int) -> float:
        t = time.perf_counter()
        for _ in range(inner):
            call()
        return (time.perf_counter() - t) / inner
    return run


def _interleaved(variants: dict, rounds: int, inner: int, warmup: int = 3) -> dict[str, float]:
    runs = {name: _timer(call) for name, call in variants.items()}
    for run in runs.values():
        run(warmup)
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run(inner))
    return {name: statistics.median(v) for name, v in samples.items()}


def op_variants(model, layer: int, rows: int, seed: int = 0) -> dict:
    mlp = model.model.layers[layer].mlp
    w_in = [mlp.gate_proj.weight.detach(), mlp.up_proj.weight.detach()]
    w_out = mlp.down_proj.weight.detach()
    d, f = w_in[0].shape[1], w_in[0].shape[0]
    group = int4_group_size([d, f])
    packs = mlp_weights.make_copies(w_in, w_out, "gated", row_skip=True, bits=(4, 8), group_size=group)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, 1, d, generator=g)
    op = torch.ops.solc.mlp.default

    def call(keep, bits, hints):
        def run():
            with step_hints(hints):
                op(x, keep, bits, w_in, [None, None], w_out, None, "gated", "silu", "weight", packs, group)
        return run

    variants = {}
    for k in KEEPS:
        for b in BITS:
            keep = torch.full((rows, 1), k, dtype=torch.float64)
            bits = torch.full((rows, 1), float(b), dtype=torch.float64)
            variants[f"mlp {k} / {b} bit"] = call(keep, bits, StepHints(mlp=k, bits=b))
    if rows > 1:  # mixed rows: every row its own random action, no hints (the generic graph)
        pick = torch.randint(len(KEEPS) * len(BITS), (rows,), generator=g)
        keep = torch.tensor([KEEPS[i // 3] for i in pick], dtype=torch.float64)[:, None]
        bits = torch.tensor([float(BITS[i % 3]) for i in pick], dtype=torch.float64)[:, None]
        variants["mixed rows"] = call(keep, bits, None)
    return variants


def step_variants(sol, context: int) -> dict:
    space = sol.space
    ids = torch.randint(0, 1000, (1, context + 1), generator=torch.Generator().manual_seed(0))
    cache = sol.new_cache(batch=1, max_len=context + 1)
    with torch.no_grad():
        sol(ids[:, :context], torch.full((1, context), space.dense_index), torch.arange(context)[None], cache)
    pos = torch.full((1, 1), context)
    variants = {}
    for attn, mlp, bits in ((1.0, 1.0, 16), (1.0, 1.0, 8), (1.0, 1.0, 4), (1.0, 0.4, 8), (1.0, 0.4, 16), (1.0, 0.4, 4)):
        a = torch.full((1, 1), space.index(solc.Action(attn, mlp, bits)))
        hints = StepHints(attn=attn, mlp=mlp, bits=bits, kv_len=context + 1)

        def run(a=a, hints=hints):
            with torch.no_grad(), step_hints(hints):
                sol(ids[:, context:], a, pos, cache)
        variants[f"attn {attn} / mlp {mlp} / {bits} bit"] = run
    return variants


def _table(title: str, medians: dict[str, float], dense: str) -> list[str]:
    lines = [title, f"{'variant':<30} {'ms':>8} {'ratio':>7}"]
    for name, t in medians.items():
        lines.append(f"{name:<30} {t * 1e3:8.3f} {t / medians[dense]:7.2f}")
    return lines


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--inner", type=int, default=20)
    parser.add_argument("--step", action="store_true", help="also time whole decode steps")
    parser.add_argument("--context", type=int, default=512)
    parser.add_argument("--out", default="benchmarks/results/mlp_cpu.json")
    args = parser.parse_args(argv)
    for option, values in (("--threads", args.threads), ("--rounds", [args.rounds]), ("--inner", [args.inner]),
                           ("--context", [args.context])):
        if min(values) < 1:
            parser.error(f"{option}={' '.join(map(str, values))} is invalid: expected integers >= 1")
    if args.layer < 0:
        parser.error(f"--layer={args.layer} is invalid: expected an integer >= 0")
    check_result_path(parser, args.out, "python -m benchmarks.mlp_cpu", "--out")
    command = "python -m benchmarks.mlp_cpu " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    model = solc.load_model(args.model)
    layers = len(model.model.layers)
    if args.layer >= layers:
        parser.error(f"--layer={args.layer} is invalid: expected an integer in 0..{layers - 1} ({args.model})")
    try:
        sol = solc.compile(model, max_seq_len=args.context + 8) if args.step else None
    except ArgumentError as e:
        if e.argument != "max_seq_len":
            raise
        parser.error(f"--context={args.context} is invalid: the model's positions must hold it + 8 ({e})")
    results, lines = [], []
    for threads in args.threads:
        torch.set_num_threads(threads)
        for rows in (1, 16):
            med = _interleaved(op_variants(model, args.layer, rows), args.rounds, args.inner)
            dense = "mlp 1.0 / 16 bit"
            lines += _table(f"\nsolc::mlp, layer {args.layer}, {rows} row(s), {threads} thread(s)", med, dense)
            results += [{"part": "op", "threads": threads, "rows": rows, "variant": k, "seconds": v,
                         "ratio_to_dense": v / med[dense]} for k, v in med.items()]
        if sol is not None:
            med = _interleaved(step_variants(sol, args.context), max(5, args.rounds // 3), max(2, args.inner // 4))
            dense = "attn 1.0 / mlp 1.0 / 16 bit"
            lines += _table(f"\nwhole decode step, context {args.context}, batch 1, {threads} thread(s)", med, dense)
            results += [{"part": "step", "threads": threads, "rows": 1, "context": args.context, "variant": k,
                         "seconds": v, "ratio_to_dense": v / med[dense]} for k, v in med.items()]
    print("\n".join(lines))
    out = Path(args.out)
    atomic_write_bytes(out, json.dumps({"command": command, "model": args.model, "torch": torch.__version__,
                                        "results": results}, indent=2).encode())


if __name__ == "__main__":
    main()
