"""A/B of two versions of the CPU attention kernel (runtime/ops/cpu_attention.c) in one process.

    python benchmarks/attention_ab.py --base HEAD~1                       # the working tree against HEAD~1
    python benchmarks/attention_ab.py --base 1dd56a5 --head 5a87910 --kv text --context 8000

Each version's cpu_attention.c (and the headers next to it) is compiled on its own, with the project's
flags, into a library of its own; both are loaded with ctypes and `solc_decode_attention` runs on the
same inputs (30 layers of SmolLM2-135M shapes, batch 1, one decode step; random keys or the model's own
cache of text, as benchmarks/attention_cpu.py makes them), the versions and thread counts by turns,
round after round. On this shared 2-core machine separate processes move by ~10% between runs, more
than most kernel changes; calls by turns in one process see the same machine. Both versions must have
the same C signature (cpu_linear.SIGNATURES). The table shows medians and head / base; outputs are
compared (max |head - base|, the last layer's) and the base's against reference.quest_attention. Writes
JSON (with the command) under --out.
"""
from __future__ import annotations

import ctypes
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before torch loads: Ctrl-C during the imports ends with one line
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("attention_ab.py")

import torch  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package

import attention_cpu  # noqa: E402
import kernel_build  # noqa: E402
from runtime.ops import cpu_attention, reference  # noqa: E402

def build(rev: str | None, out_dir: Path, name: str) -> ctypes.CDLL:
    """cpu_attention.c of git revision `rev` (None: the working tree), built into out_dir/name.so."""
    return kernel_build.build(rev, out_dir, name, ("cpu_attention.c",),
                              ("solc_decode_attention", "solc_decode_attention_scratch"))


def prepared(layers: list[tuple], keep: float) -> list[tuple]:
    """Per layer the kernel's arguments: q [1, Hq, D], caches, page statistics over keys <= p, p, kept pages."""
    out = []
    for q, k, v, p, low, high in layers:
        kept = cpu_attention._kept_page_count(p, keep) or 0
        out.append((q.reshape(1, q.shape[1], q.shape[-1]).contiguous(), k, v, low, high, torch.tensor([p]),
                    torch.tensor([kept])))
    return out


def run(lib, steps: list[tuple], threads: int, out: torch.Tensor) -> float:
    """One decode step's attention over every layer; returns ms."""
    q0, k0, _, low0, *_ = steps[0]
    Hq, Hkv, S, D, P = q0.shape[1], k0.shape[1], k0.shape[2], k0.shape[3], low0.shape[2]
    per_task = lib.solc_decode_attention_scratch(Hq // Hkv, S, P, D)
    scratch = torch.empty(Hkv * per_task)
    start = time.perf_counter()
    for q, k, v, low, high, pos, kept in steps:
        lib.solc_decode_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), low.data_ptr(), high.data_ptr(),
                                  pos.data_ptr(), kept.data_ptr(), 1, Hq, Hkv, S, P, D, attention_cpu.SCALE,
                                  out.data_ptr(), scratch.data_ptr(), per_task, threads)
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> dict:
    p = kernel_build.ab_parser(__doc__, rounds=7)
    p.add_argument("--kv", choices=("random", "text"), default="random")
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--keeps", default="1,0.6,0.1")
    args, command, threads = kernel_build.ab_args(p, "attention_ab.py", argv)
    if not attention_cpu.context_ok(args.kv)(args.context):
        p.error(f"--context={args.context} is invalid: expected {attention_cpu.context_valid(args.kv)}")
    kernel_build.check_json(p, args.out, f"attention_ab_{args.kv}_{args.context}", args.tag, "attention_ab.py")
    keeps = kernel_build.list_arg(p, "--keeps", args.keeps, float, lambda k: 0 < k <= 1, "numbers in (0, 1]")
    with tempfile.TemporaryDirectory() as tmp:
        libs = kernel_build.build_pair(p, args.base, args.head, Path(tmp), build)
        layers = (attention_cpu.random_layers(args.context) if args.kv == "random"
                  else attention_cpu.text_layers(args.context))
        rows = []
        for keep in keeps:
            steps = prepared(layers, keep)
            q = steps[0][0]
            outs = {name: torch.empty_like(q) for name in libs}
            samples = {(name, t): [] for name in libs for t in threads}
            for r in range(args.rounds + 1):  # round 0 warms up
                for t in threads:
                    for name, lib in libs.items():
                        ms = run(lib, steps, t, outs[name])
                        if r:
                            samples[(name, t)].append(ms)
            diff = float((outs["head"] - outs["base"]).abs().max())  # the last layer's output
            lq, lk, lv, lp, _, _ = layers[-1]
            want = reference.quest_attention(lq.reshape(1, -1, 1, lq.shape[-1]), lk, lv, torch.tensor([[lp]]),
                                             torch.tensor([[keep]], dtype=torch.float64), attention_cpu.SCALE)
            err = float((outs["base"] - want.reshape(outs["base"].shape)).abs().max())
            for t in threads:
                base, head = (statistics.median(samples[(n, t)]) for n in ("base", "head"))
                rows.append({"keep": keep, "threads": t, "base_ms": round(base, 3), "head_ms": round(head, 3),
                             "head_over_base": round(head / base, 3), "max_abs_diff": diff, "base_err_vs_reference": err,
                             "base_rounds": [round(x, 3) for x in samples[("base", t)]],
                             "head_rounds": [round(x, 3) for x in samples[("head", t)]]})
    print(f"solc_decode_attention, {args.kv} keys, {args.context} tokens, 30 layers; base {args.base}, "
          f"head {args.head or 'working tree'}; median of {args.rounds} rounds by turns")
    print(f"{'keep':>5} {'threads':>7} {'base ms':>8} {'head ms':>8} {'head/base':>9} {'max diff':>9}")
    for row in rows:
        print(f"{row['keep']:>5} {row['threads']:>7} {row['base_ms']:>8.2f} {row['head_ms']:>8.2f} "
              f"{row['head_over_base']:>9.3f} {row['max_abs_diff']:>9.2e}")
    result = {"command": command, "base": args.base, "head": args.head, "kv": args.kv, "context": args.context,
              "device": attention_cpu.device_name(torch.device("cpu")), "torch": torch.__version__, "rows": rows}
    kernel_build.write_json(args.out, f"attention_ab_{args.kv}_{args.context}", args.tag, result)
    return result


if __name__ == "__main__":
    import bench_cli

    sys.exit(bench_cli.run(main, "attention_ab.py"))
