"""A/B of two versions of the CPU int4 linear (runtime/ops/cpu_mlp.c, `solc_int4_linear`) in one process.

    python benchmarks/int4_ab.py --base HEAD~1                       # the working tree against HEAD~1
    python benchmarks/int4_ab.py --base 42b51c4 --threads 1,2 --rows 1,4 --out benchmarks/results --tag slices

Each version's cpu_linear.c + cpu_mlp.c is compiled on its own with the project's flags and loaded with
ctypes. Both run the int4 linears of one decode step of SmolLM2-135M (each layer's gate/up copy
3072 x 576 and down copy 576 x 1536, groups of 64, quantized from the real weights as `solc.compile`
does), each layer's pair after --flush-mib MiB of other reads, as a step's fp32 weights come between
them: without those, 40 MB of int4 copies partly stay in a 32 MB L3 and the figures flatter. A version
that has `solc_pack_i4` gets its packed copies, registered as cpu_linear.py does. Versions, thread counts
and row counts run by turns, round after round: on this shared machine separate processes move by ~10%.
The table shows medians of the int4 calls' time and head / base; outputs are compared (bits, and the
head against x_bf16 @ dequant(W)^T in bf16 ulps of the row maximum). Writes JSON (with the command)
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

    quiet_ctrl_c_while_loading("int4_ab.py")

import torch  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package

import attention_cpu  # noqa: E402
import kernel_build  # noqa: E402
import solc  # noqa: E402
from runtime.ops import mlp_weights, quant_primitives as qp  # noqa: E402

FUNCTIONS = ("solc_int4_linear", "solc_int4_supported", "solc_pack_register")


def build(rev: str | None, out_dir: Path, name: str):
    lib = kernel_build.build(rev, out_dir, name, ("cpu_linear.c", "cpu_mlp.c"), FUNCTIONS)
    if not lib.solc_int4_supported():
        raise SystemExit("this CPU has no AVX-512 BF16: cpu_mlp.c's int4 linear is not built here")
    return lib


def layers(count: int) -> list[dict]:
    """The int4 copies (and scales) of SmolLM2-135M's first `count` MLPs, as solc.compile makes them."""
    model = solc.load_model("smollm2-135m")
    out = []
    for layer in model.model.layers[:count]:
        m = layer.mlp
        w_in = [m.gate_proj.weight, m.up_proj.weight]
        group = qp.int4_group_size([w_in[0].shape[1], w_in[0].shape[0]])
        c = mlp_weights.unpack(mlp_weights.make_copies(w_in, m.down_proj.weight, "gated", row_skip=False, bits=(4,),
                                                       group_size=group))
        out.append({"in4": c["in4"], "in4_sz": c["in4_sz"], "out4": c["out4"], "out4_sz": c["out4_sz"],
                    "group": group})
    return out


def pack(lib, copies: list[dict]) -> list[torch.Tensor]:
    """The version's packed copies (where it has solc_pack_i4), registered in its table; returns them (held)."""
    if not hasattr(lib, "solc_pack_i4"):
        return []
    from runtime.ops import cpu_linear

    fn = lib.solc_pack_i4
    fn.argtypes = cpu_linear.SIGNATURES["solc_pack_i4"]
    held = []
    for c in copies:
        for which in ("in4", "out4"):
            q, sz, g = c[which], c[which + "_sz"], c["group"]
            N, KB = q.shape
            copy = torch.empty(cpu_linear._int4_packed_bytes(q, sz, g), dtype=torch.uint8)
            fn(q.data_ptr(), sz.data_ptr(), g, N, KB, copy.data_ptr())
            lib.solc_pack_register(q.data_ptr(), N, KB, copy.data_ptr())
            held.append(copy)
    return held


def run(lib, copies, flush, x, h, outs, rows: int, threads: int) -> float:
    """One step's int4 linears (each layer's after its flush read); returns ms of the int4 calls."""
    total = 0.0
    for c, f, (yg, yd) in zip(copies, flush, outs):
        f.sum()
        g = c["group"]
        start = time.perf_counter()
        for which, inp, y in (("in4", x, yg), ("out4", h, yd)):
            q = c[which]
            lib.solc_int4_linear(inp.data_ptr(), inp.shape[1], q.data_ptr(), c[which + "_sz"].data_ptr(), g,
                                 y.data_ptr(), rows, q.shape[0], inp.shape[1], threads)
        total += time.perf_counter() - start
    return total * 1e3


def ulps_vs_reference(y: torch.Tensor, x: torch.Tensor, c: dict, which: str) -> float:
    want = qp.to_bf16_grid(qp.to_bf16_grid(x, torch.float32) @ qp.dequant_int4(c[which], c[which + "_sz"], c["group"],
                                                                               torch.float32).t(), torch.float32)
    ulp = torch.exp2(torch.floor(torch.log2(want.abs().amax(dim=1, keepdim=True))) - 7)
    return float(((y - want).abs() / ulp).max())


def main(argv=None) -> dict:
    p = kernel_build.ab_parser(__doc__, rounds=15)
    p.add_argument("--rows", default="1,4", help="batch rows per call (1..16)")
    p.add_argument("--layers", type=int, default=30, help="SmolLM2 layers (1..30)")
    p.add_argument("--flush-mib", type=float, default=7.0, help="MiB read before each layer's pair (0: none)")
    args, command, threads = kernel_build.ab_args(p, "int4_ab.py", argv)
    row_counts = kernel_build.list_arg(p, "--rows", args.rows, int, lambda r: 1 <= r <= 16, "integers in 1..16")
    if not 1 <= args.layers <= 30:
        p.error(f"--layers={args.layers} is invalid: expected an integer in 1..30")
    if args.flush_mib < 0:
        p.error(f"--flush-mib={args.flush_mib} is invalid: expected a number >= 0")
    kernel_build.check_json(p, args.out, "int4_ab", args.tag, "int4_ab.py")
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        libs = kernel_build.build_pair(p, args.base, args.head, Path(tmp), build)
        copies = layers(args.layers)
        held = {name: pack(lib, copies) for name, lib in libs.items()}
        flush = [torch.randn(max(1, int(args.flush_mib * 2 ** 20) // 4)) for _ in copies]
        gen = torch.Generator().manual_seed(0)
        x, h = torch.randn(16, 576, generator=gen), torch.randn(16, 1536, generator=gen)
        outs = {(name, r): [(torch.zeros(r, 3072), torch.zeros(r, 576)) for _ in copies]
                for name in libs for r in row_counts}
        samples = kernel_build.by_turns(libs, threads, row_counts, args.rounds,
                                        lambda name, lib, t, r: run(lib, copies, flush, x, h, outs[(name, r)], r, t))
        rows = []
        for t in threads:
            for r in row_counts:
                same = all(torch.equal(a, b) for pa, pb in zip(outs[("base", r)], outs[("head", r)])
                           for a, b in zip(pa, pb))
                yg, yd = outs[("head", r)][-1]
                ulps = max(ulps_vs_reference(yg, x[:r], copies[-1], "in4"), ulps_vs_reference(yd, h[:r], copies[-1], "out4"))
                rows.append({**kernel_build.timing_row(samples, t, r), "same_bits": same, "head_ulps_vs_reference": ulps,
                             "packed": {n: bool(held[n]) for n in libs}})
    kernel_build.print_table(f"solc_int4_linear, SmolLM2-135M's {args.layers} layers (gate/up + down), {args.flush_mib:g} MiB "
                             f"read before each layer; base {args.base}, head {args.head or 'working tree'}; median of "
                             f"{args.rounds} rounds", rows, (("same bits", "same_bits", ""), ("ulps", "head_ulps_vs_reference", ".2f")))
    result = {"command": command, "base": args.base, "head": args.head, "layers": args.layers,
              "flush_mib": args.flush_mib, "device": attention_cpu.device_name(torch.device("cpu")),
              "torch": torch.__version__, "rows": rows}
    kernel_build.write_json(args.out, "int4_ab", args.tag, result)
    return result


if __name__ == "__main__":
    import bench_cli

    sys.exit(bench_cli.run(main, "int4_ab.py"))
