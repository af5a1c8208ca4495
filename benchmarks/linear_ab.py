"""A/B of two versions of the batch-invariant fp32 linear (runtime/ops/cpu_linear.c, `solc_linear_f32`) in
one process, at decode batch sizes above 1 (the 4 x 4 register tiles and their edge rows).

    python benchmarks/linear_ab.py --base HEAD~1                      # the working tree against HEAD~1
    python benchmarks/linear_ab.py --base 42b51c4 --rows 2,3,4,7,16 --threads 1,2 --out benchmarks/results

Each version's cpu_linear.c is compiled on its own with the project's flags and loaded with ctypes. Both
run one layer's linears of SmolLM2-135M's shapes (q, k, v, o, gate + up, down), --copies random copies of
each, so the weights stream from memory as in a decode step, on the same x; versions, thread counts
and row counts by turns, round after round (separate processes move by ~10% on this machine). The table
shows medians and head / base; outputs must be bit-equal (every version sums each output in the same
fixed order), and the head's last copy is compared with torch's matmul. Writes JSON (with the command)
under --out.
"""
from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before torch loads: Ctrl-C during the imports ends with one line
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("linear_ab.py")

import torch  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package

import attention_cpu  # noqa: E402
import kernel_build  # noqa: E402

SHAPES = ((576, 576), (192, 576), (192, 576), (576, 576), (3072, 576), (576, 1536))  # (N, K) of one layer


def build(rev: str | None, out_dir: Path, name: str):
    return kernel_build.build(rev, out_dir, name, ("cpu_linear.c",), ("solc_linear_f32",))


def run(lib, weights, x, outs, rows: int, threads: int) -> float:
    """Every copy's linears at `rows` rows; returns ms."""
    start = time.perf_counter()
    for copy, ys in zip(weights, outs):
        for w, y in zip(copy, ys):
            N, K = w.shape
            lib.solc_linear_f32(x.data_ptr(), x.shape[1], w.data_ptr(), None, y.data_ptr(), rows, N, K, threads)
    return (time.perf_counter() - start) * 1e3


def main(argv=None) -> dict:
    p = kernel_build.ab_parser(__doc__, rounds=9)
    p.add_argument("--rows", default="2,3,4,7,16", help="batch rows per call (2..64)")
    p.add_argument("--copies", type=int, default=12, help="copies of each weight (1..64)")
    args, command, threads = kernel_build.ab_args(p, "linear_ab.py", argv)
    row_counts = kernel_build.list_arg(p, "--rows", args.rows, int, lambda r: 2 <= r <= 64, "integers in 2..64")
    if not 1 <= args.copies <= 64:
        p.error(f"--copies={args.copies} is invalid: expected an integer in 1..64")
    kernel_build.check_json(p, args.out, "linear_ab", args.tag, "linear_ab.py")
    gen = torch.Generator().manual_seed(0)
    weights = [[torch.randn(n, k, generator=gen) * 0.05 for n, k in SHAPES] for _ in range(args.copies)]
    x = torch.randn(max(row_counts), max(k for _, k in SHAPES), generator=gen)
    with tempfile.TemporaryDirectory() as tmp:
        libs = kernel_build.build_pair(p, args.base, args.head, Path(tmp), build)
        outs = {(name, r): [[torch.zeros(r, n) for n, _ in SHAPES] for _ in weights] for name in libs for r in row_counts}
        samples = kernel_build.by_turns(libs, threads, row_counts, args.rounds,
                                        lambda name, lib, t, r: run(lib, weights, x, outs[(name, r)], r, t))
    rows = []
    for t in threads:
        for r in row_counts:
            same = all(torch.equal(a, b) for ca, cb in zip(outs[("base", r)], outs[("head", r)]) for a, b in zip(ca, cb))
            err = max(float((y - x[:r, :w.shape[1]] @ w.t()).abs().max()) for w, y in zip(weights[-1], outs[("head", r)][-1]))
            rows.append({**kernel_build.timing_row(samples, t, r), "same_bits": same, "head_err_vs_torch": err})
    kernel_build.print_table(f"solc_linear_f32, one SmolLM2 layer's linears x {args.copies} copies; base {args.base}, "
                             f"head {args.head or 'working tree'}; median of {args.rounds} rounds by turns", rows,
                             (("same bits", "same_bits", ""), ("vs torch", "head_err_vs_torch", ".1e")))
    result = {"command": command, "base": args.base, "head": args.head, "copies": args.copies,
              "device": attention_cpu.device_name(torch.device("cpu")), "torch": torch.__version__, "rows": rows}
    kernel_build.write_json(args.out, "linear_ab", args.tag, result)
    return result


if __name__ == "__main__":
    import bench_cli

    sys.exit(bench_cli.run(main, "linear_ab.py"))
