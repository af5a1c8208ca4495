"""The CPU attention kernel over the same KV caches on 4 KB pages and on transparent huge pages
(runtime/hugepages.py), by turns in one process.

    python benchmarks/hugepages_ab.py                                  # random keys, 16k tokens
    python benchmarks/hugepages_ab.py --context 4096 --keeps 1,0.1 --out benchmarks/results --tag 1207

30 layers of SmolLM2-135M shapes, batch 1, one decode step (benchmarks/attention_cpu.py's random caches),
the working tree's cpu_attention.c. "base" reads copies of the caches allocated by torch (4 KB pages), "head"
copies from `hugepages.empty` (huge pages for buffers of at least hugepages.MIN_BYTES: 4 MB, 5.5k tokens); max diff compares their outputs (the same bits: 0). Medians of --rounds; JSON under --out.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before torch loads: Ctrl-C during the imports ends with one line
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("hugepages_ab.py")

import torch  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))

import attention_ab  # noqa: E402
import attention_cpu  # noqa: E402
import kernel_build  # noqa: E402
from runtime import hugepages  # noqa: E402


def plain(t: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(t).copy_(t)


def on_huge_pages(t: torch.Tensor) -> torch.Tensor:
    out = hugepages.empty(tuple(t.shape), t.dtype)
    return out.copy_(t)


def main(argv=None) -> dict:
    p = kernel_build.ab_parser(__doc__, rounds=7, revisions=False)
    p.add_argument("--context", type=int, default=16384)
    p.add_argument("--keeps", default="1,0.6,0.1")
    args, command, threads = kernel_build.ab_args(p, "hugepages_ab.py", argv)
    if args.context < 16:
        p.error(f"--context={args.context} is invalid: expected an integer >= 16")
    keeps = kernel_build.list_arg(p, "--keeps", args.keeps, float, lambda k: 0 < k <= 1, "numbers in (0, 1]")
    if hugepages._madvise() is None:
        p.error("no transparent huge pages to ask for on this machine (or SOLC_HUGEPAGES=0)")
    kernel_build.check_json(p, args.out, f"hugepages_ab_{args.context}", args.tag, "hugepages_ab.py")
    with tempfile.TemporaryDirectory() as tmp:
        lib = attention_ab.build(None, Path(tmp), "kernel")
        layers = attention_cpu.random_layers(args.context)
        # both sides read copies, made the same way but for the pages: reading the caches as random_layers
        # made them ran 3-5% slower than reading a plain copy (16k tokens), whatever the pages
        small = [(q, plain(k), plain(v), pos, plain(lo), plain(hi)) for q, k, v, pos, lo, hi in layers]
        huge = [(q, on_huge_pages(k), on_huge_pages(v), pos, on_huge_pages(lo), on_huge_pages(hi))
                for q, k, v, pos, lo, hi in layers]
        rows = []
        for keep in keeps:
            steps = {"base": attention_ab.prepared(small, keep), "head": attention_ab.prepared(huge, keep)}
            outs = {name: torch.empty_like(s[0][0]) for name, s in steps.items()}
            samples = kernel_build.by_turns({"base": lib, "head": lib}, threads, [1], args.rounds,
                                            lambda name, lib, t, _: attention_ab.run(lib, steps[name], t, outs[name]))
            diff = float((outs["head"] - outs["base"]).abs().max())  # the last layer's output: must be 0
            rows += [dict(keep=keep, max_abs_diff=diff, **kernel_build.timing_row(samples, t, 1)) for t in threads]
    kernel_build.print_table(f"solc_decode_attention, random keys, {args.context} tokens, 30 layers; base: 4 KB "
                             f"pages, head: huge pages; median of {args.rounds} rounds by turns", rows,
                             extra=(("keep", "keep", "g"), ("max diff", "max_abs_diff", ".2e")))
    result = {"command": command, "context": args.context, "device": attention_cpu.device_name(torch.device("cpu")),
              "torch": torch.__version__, "rows": rows}
    kernel_build.write_json(args.out, f"hugepages_ab_{args.context}", args.tag, result)
    return result


if __name__ == "__main__":
    import bench_cli

    sys.exit(bench_cli.run(main, "hugepages_ab.py"))
