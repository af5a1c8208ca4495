"""Kernel benchmark: each Triton kernel at each keep level / bit width against the dense baseline.

    python benchmarks/kernels.py                      # on a CUDA device: every section, default grid
    python benchmarks/kernels.py --quick              # fewer levels/contexts (a smoke run on the GPU)
    python benchmarks/kernels.py --sections mlp       # one section: mlp, quant, attn
    python benchmarks/kernels.py --models llama-3.2-1b --contexts 16384,32768
    python benchmarks/kernels.py --no-autotune        # launch heuristics only (no autotuning)

Without CUDA it prints that the GPU benchmark was skipped, runs a tiny correctness sanity subset of every
kernel under the Triton CPU interpreter, and exits 0.

Sections (one layer's op; shapes of SmolLM2-135M, Llama-3.2-1B, Llama-3.1-8B; --dtype, default bfloat16):
  mlp-in    the MLP input projection at `rows` tokens: dense = act(x Wg^T) * (x Wu^T) with cuBLAS
            (F.linear on the concatenated [Wg; Wu], the fastest dense form: one GEMV/GEMM) vs the sparse
            kernels (top-k select + column-skipping GEMV/GEMM over the kept channels, fused gate/up/act).
  mlp       the whole MLP site incl. the dense down projection and the output quantizer at 16 bits:
            reference.mlp at keep 1 (3 cuBLAS GEMVs) vs runtime.kernels.mlp.sparse_mlp.
  quant     fake quantization of the MLP output [rows, d]: torch reference vs the fused kernel.
  lowbit    the whole MLP site in quant="weight" mode at 8 and 4 bits (runtime.kernels.lowbit: int8 /
            int4 weight copies made with torchao's primitives, bf16 activations), keep 1 and 0.4, vs the
            dense site in --dtype (3 cuBLAS GEMVs); level = bits + keep / 10 (8.04: 8 bits, keep 0.4).
            Needs torchao importable (skipped with a message otherwise).
  attn      decode attention, one query per row at position `context`: dense = SDPA over the
            context+1 visible keys (GQA, flash/efficient backend) vs the Quest kernels (page scoring,
            top-k pages, split-K attention over the kept pages, combine); `append` adds the step's
            KV write + page-statistics refresh, i.e. the whole solc::attention decode step.
Timings: median of triton.testing.do_bench (launches from Python, each call) and, in `graph_us`, of
triton.testing.do_bench_cudagraph (replayed CUDA graph: what the runtime's decode loop sees). speedup
columns are dense / kernel for each. max_err is the kernel vs the reference implementation (float32).

Writes JSON and CSV (command line, device name, torch/triton versions, date) under --out, after every
section (meta "complete" turns true after the last): an interrupted run keeps the sections it finished.
Targets (issue 4): mlp-in keep 0.5 at Llama-3.2-1B / Llama-3.1-8B shapes >= 1.6x dense (batch 1);
attn keep 0.1 at context >= 16k >= 4x dense decode attention. The summary says which hold.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before torch loads: Ctrl-C during the imports ends with one line
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("kernels.py")

import argparse  # noqa: E402
import csv  # noqa: E402
import datetime  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import platform  # noqa: E402
import shlex  # noqa: E402

import torch  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package

import torch.nn.functional as F  # noqa: E402

import bench_cli  # noqa: E402
from runtime.ops import reference as ref  # noqa: E402
from solc.cache import atomic_write_bytes  # noqa: E402

MODELS = {  # d_model, d_ffn, query heads, KV heads, head dim
    "smollm2-135m": dict(d=576, ffn=1536, hq=9, hkv=3, hd=64),
    "llama-3.2-1b": dict(d=2048, ffn=8192, hq=32, hkv=8, hd=64),
    "llama-3.1-8b": dict(d=4096, ffn=14336, hq=32, hkv=8, hd=128),
}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def _floats(s: str) -> list[float]:
    return [float(v) for v in s.split(",") if v]


def _ints(s: str) -> list[int]:
    return [int(v) for v in s.split(",") if v]


SECTIONS = ("mlp-in", "mlp", "quant", "lowbit", "attn")
# option: (default, --quick's value, parse, valid, what is valid)
LISTS = {
    "sections": (",".join(SECTIONS), None, str, lambda v: v in SECTIONS, f"comma-separated sections of {', '.join(SECTIONS)}"),
    "models": (",".join(MODELS), None, str, lambda v: v in MODELS, f"comma-separated models of {', '.join(MODELS)}"),
    "rows": ("1,4,16", "1,16", int, lambda v: v >= 1, "comma-separated integers >= 1"),
    "mlp_keeps": ("0.25,0.4,0.5,0.6,0.8,1.0", "0.5,1.0", float, lambda v: 0 < v <= 1, "comma-separated numbers in (0, 1]"),
    "bits": ("5,7,8,16", "5,16", float, lambda v: v >= 2, "comma-separated numbers >= 2 (16 and up: unquantized)"),
    "attn_keeps": ("0.1,0.25,0.6,1.0", "0.1,1.0", float, lambda v: 0 < v <= 1, "comma-separated numbers in (0, 1]"),
    "contexts": ("1024,2048,4096,8192,16384,32768", "4096,16384", int, lambda v: v >= 1, "comma-separated integers >= 1"),
    "attn_batches": ("1,8", "1", int, lambda v: v >= 1, "comma-separated integers >= 1"),
}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = {"rows": "MLP tokens per call (decode batch)"}
    for option, (default, quick, _, _, _) in LISTS.items():
        given = f"; --quick: {quick}" if quick else ""
        p.add_argument(f"--{option.replace('_', '-')}", default=None,
                       help=f"{helps.get(option, 'comma-separated')} (default {default}{given})")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--no-autotune", action="store_true", help="launch heuristics only")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings")
    p.add_argument("--quick", action="store_true", help="a few levels and contexts (the lists not given)")
    p.add_argument("--out", default="benchmarks/results")
    args = p.parse_args(argv)
    for option, (default, quick, parse, ok, valid) in LISTS.items():
        text = getattr(args, option)
        if text is None:
            text = quick if args.quick and quick else default
        try:
            values = [parse(v) for v in text.split(",")]
        except ValueError:
            values = []
        if not values or not all(ok(v) for v in values):
            p.error(f"--{option.replace('_', '-')}={text} is invalid: expected {valid}")
        setattr(args, option, text)
    if os.path.lexists(args.out) and not Path(args.out).is_dir():
        p.error(f"--out={args.out!r} is invalid: expected a folder (the JSON and CSV are written into it)")
    args.command = "python benchmarks/kernels.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    return args


# ---------------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------------
def bench(fn, graph: bool) -> tuple[float, float | None]:
    """(median us with Python launches, median us replaying a CUDA graph) of fn()."""
    import triton.testing as tt

    fn()  # autotune / compile / allocate outside any timing and outside the graph capture
    torch.cuda.synchronize()
    eager = tt.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3
    replay = None
    if graph:
        try:
            replay = tt.do_bench_cudagraph(fn, rep=100, return_mode="median") * 1e3
        except Exception as e:  # a path that cannot be captured: report it, keep the eager number
            print(f"  (cuda graph timing failed: {type(e).__name__}: {e})")
    return eager, replay


def _ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def _err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


# ---------------------------------------------------------------------------------------------------
# sections
# ---------------------------------------------------------------------------------------------------
def _mlp_weights(shape, dtype, dev, seed=0):
    g = torch.Generator(device=dev).manual_seed(seed)
    d, f = shape["d"], shape["ffn"]
    wg = torch.randn(f, d, generator=g, device=dev, dtype=dtype) * d ** -0.5
    wu = torch.randn(f, d, generator=g, device=dev, dtype=dtype) * d ** -0.5
    wo = torch.randn(d, f, generator=g, device=dev, dtype=dtype) * f ** -0.5
    return wg, wu, wo


def run_mlp_in(args, dtype, dev, graph, rows_out):
    from runtime.kernels import mlp as K
    from runtime.kernels._common import N_BUCKETS

    for model in args.models.split(","):
        shape = MODELS[model]
        wg, wu, wo = _mlp_weights(shape, dtype, dev)
        w_cat = torch.cat([wg, wu])  # the dense baseline's single GEMV over both projections
        weights = K.input_weights([wg, wu], [None, None], "gated")
        for rows in _ints(args.rows):
            x = torch.randn(rows, shape["d"], device=dev, dtype=dtype)

            def dense():
                gate, up = F.linear(x, w_cat).chunk(2, dim=-1)
                return F.silu(gate) * up

            dense_us, dense_graph = bench(dense, graph)
            for keep_level in _floats(args.mlp_keeps):
                keep = torch.full((rows,), keep_level, dtype=torch.float64, device=dev)
                bucket = min(N_BUCKETS, max(1, math.ceil(keep_level * N_BUCKETS - 1e-9)))
                launch = dict(bucket=bucket, tuned=False if args.no_autotune else None)

                def sparse():
                    return K.mlp_input_projection(x, keep, weights, "silu", **launch)

                us, g_us = bench(sparse, graph)
                xp = ref.prune_mlp_input(x.float(), keep)
                expected = F.silu(F.linear(xp, wg.float())) * F.linear(xp, wu.float())
                row = dict(section="mlp-in", model=model, rows=rows, level=keep_level, dense_us=dense_us,
                           kernel_us=us, speedup=_ratio(dense_us, us), dense_graph_us=dense_graph,
                           graph_us=g_us, graph_speedup=_ratio(dense_graph, g_us), max_err=_err(sparse(), expected))
                rows_out.append(row)
                _print_row(row)


def run_mlp(args, dtype, dev, graph, rows_out):
    from runtime.kernels import mlp as K
    from runtime.kernels._common import N_BUCKETS

    for model in args.models.split(","):
        shape = MODELS[model]
        wg, wu, wo = _mlp_weights(shape, dtype, dev)
        for rows in _ints(args.rows):
            x = torch.randn(rows, shape["d"], device=dev, dtype=dtype)
            bits = torch.full((rows,), 16.0, dtype=torch.float64, device=dev)

            def dense():
                return ref.mlp(x, None, None, [wg, wu], [None, None], wo, None, "gated", "silu")

            dense_us, dense_graph = bench(dense, graph)
            for keep_level in _floats(args.mlp_keeps):
                keep = torch.full((rows,), keep_level, dtype=torch.float64, device=dev)
                bucket = min(N_BUCKETS, max(1, math.ceil(keep_level * N_BUCKETS - 1e-9)))
                launch = dict(bucket=bucket, tuned=False if args.no_autotune else None)

                def sparse():
                    return K.sparse_mlp(x, keep, bits, [wg, wu], [None, None], wo, None, "gated", "silu", **launch)

                us, g_us = bench(sparse, graph)
                expected = ref.mlp(x.float(), keep, bits, [wg.float(), wu.float()], [None, None], wo.float(), None,
                                   "gated", "silu")
                row = dict(section="mlp", model=model, rows=rows, level=keep_level, dense_us=dense_us, kernel_us=us,
                           speedup=_ratio(dense_us, us), dense_graph_us=dense_graph, graph_us=g_us,
                           graph_speedup=_ratio(dense_graph, g_us), max_err=_err(sparse(), expected))
                rows_out.append(row)
                _print_row(row)


def run_quant(args, dtype, dev, graph, rows_out):
    from runtime.kernels.quant import fake_quant_rows

    for model in args.models.split(","):
        d = MODELS[model]["d"]
        for rows in _ints(args.rows):
            y = torch.randn(rows, d, device=dev, dtype=dtype)
            for b in _floats(args.bits):
                bits = torch.full((rows,), b, dtype=torch.float64, device=dev)
                out = torch.empty_like(y)
                ref_us, ref_graph = bench(lambda: ref.fake_quant(y, bits), graph)
                us, g_us = bench(lambda: fake_quant_rows(y, bits, out=out), graph)
                row = dict(section="quant", model=model, rows=rows, level=b, dense_us=ref_us, kernel_us=us,
                           speedup=_ratio(ref_us, us), dense_graph_us=ref_graph, graph_us=g_us,
                           graph_speedup=_ratio(ref_graph, g_us),
                           max_err=_err(fake_quant_rows(y, bits), ref.fake_quant(y, bits)))
                rows_out.append(row)
                _print_row(row)


def run_lowbit(args, dtype, dev, graph, rows_out):
    try:
        from runtime.ops import mlp_weights
        from runtime.ops.quant_primitives import int4_group_size
    except ImportError as e:  # torchao is imported by the copies' maker
        print(f"  lowbit skipped: {e}")
        return
    from runtime.kernels import lowbit

    for model in args.models.split(","):
        shape = MODELS[model]
        wg, wu, wo = _mlp_weights(shape, dtype, dev)
        try:
            packs = mlp_weights.make_copies([wg, wu], wo, "gated", row_skip=True, bits=(4, 8),
                                            group_size=int4_group_size([shape["d"], shape["ffn"]]))
        except ImportError as e:
            print(f"  lowbit skipped: {e}")
            return
        group = int4_group_size([shape["d"], shape["ffn"]])
        for rows in _ints(args.rows):
            x = torch.randn(rows, shape["d"], device=dev, dtype=dtype)

            def dense():
                return ref.mlp(x, None, None, [wg, wu], [None, None], wo, None, "gated", "silu")

            dense_us, dense_graph = bench(dense, graph)
            for bits in (8, 4):
                for keep_level in (1.0, 0.4):
                    keep = torch.full((rows,), keep_level, dtype=torch.float64, device=dev)
                    site = ([wg, wu], [None, None], wo, None, "gated", "silu", packs, group)

                    def kernel():
                        return lowbit.lowbit_mlp(x, keep, bits, *site[:6], packs, group, prune=keep_level < 1)

                    us, g_us = bench(kernel, graph)
                    bits_t = torch.full((rows,), float(bits), dtype=torch.float64, device=dev)
                    expected = ref.mlp(x.float(), keep, bits_t, [wg.float(), wu.float()], [None, None], wo.float(),
                                       None, "gated", "silu", "weight", packs, group)
                    row = dict(section="lowbit", model=model, rows=rows, level=bits + keep_level / 10,
                               dense_us=dense_us, kernel_us=us, speedup=_ratio(dense_us, us),
                               dense_graph_us=dense_graph, graph_us=g_us, graph_speedup=_ratio(dense_graph, g_us),
                               max_err=_err(kernel(), expected))
                    rows_out.append(row)
                    _print_row(row)


def run_attn(args, dtype, dev, graph, rows_out):
    from runtime.kernels._common import N_BUCKETS
    from runtime.kernels.attention import quest_decode_attention

    for model in args.models.split(","):
        shape = MODELS[model]
        hq, hkv, hd = shape["hq"], shape["hkv"], shape["hd"]
        for batch in _ints(args.attn_batches):
            for context in _ints(args.contexts):
                S = context + 64  # a static cache a little longer than the context
                g = torch.Generator(device=dev).manual_seed(context)
                k_cache = torch.randn(batch, hkv, S, hd, generator=g, device=dev, dtype=dtype)
                v_cache = torch.randn(batch, hkv, S, hd, generator=g, device=dev, dtype=dtype)
                pos = torch.full((batch, 1), context, dtype=torch.long, device=dev)
                low, high = ref.page_stats(k_cache, pos[:, 0] + 1)
                q = torch.randn(batch, hq, 1, hd, generator=g, device=dev, dtype=dtype)
                k = k_cache[:, :, context:context + 1].clone()
                v = v_cache[:, :, context:context + 1].clone()
                scale = hd ** -0.5
                k_vis, v_vis = k_cache[:, :, : context + 1], v_cache[:, :, : context + 1]

                def dense():
                    return F.scaled_dot_product_attention(q, k_vis, v_vis, scale=scale, enable_gqa=hkv != hq)

                dense_us, dense_graph = bench(dense, graph)
                for keep_level in _floats(args.attn_keeps):
                    keep = torch.full((batch, 1), keep_level, dtype=torch.float64, device=dev)
                    bucket = min(N_BUCKETS, max(1, math.ceil(keep_level * N_BUCKETS - 1e-9)))
                    launch = dict(bucket=bucket)
                    if args.no_autotune:
                        launch["tuned"] = False

                    def quest():
                        return quest_decode_attention(q, k_cache, v_cache, low, high, pos, keep, scale, **launch)

                    def quest_append():
                        return quest_decode_attention(q, k_cache, v_cache, low, high, pos, keep, scale, k=k, v=v,
                                                      **launch)

                    expected = ref.quest_decode(q, k_vis, v_vis, low, high, pos, keep, scale)
                    for name, fn in (("attn", quest), ("attn+append", quest_append)):
                        us, g_us = bench(fn, graph)
                        row = dict(section=name, model=model, rows=batch, context=context, level=keep_level,
                                   dense_us=dense_us, kernel_us=us, speedup=_ratio(dense_us, us),
                                   dense_graph_us=dense_graph, graph_us=g_us,
                                   graph_speedup=_ratio(dense_graph, g_us), max_err=_err(fn(), expected))
                        rows_out.append(row)
                        _print_row(row)
                del k_cache, v_cache, low, high
                torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------
# output
# ---------------------------------------------------------------------------------------------------
COLUMNS = ["section", "model", "rows", "context", "level", "dense_us", "kernel_us", "speedup",
           "dense_graph_us", "graph_us", "graph_speedup", "max_err"]


def _fmt(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.0f}"
    return str(v)


def _print_row(row):
    print("  ".join(f"{_fmt(row.get(c)):>12}" for c in COLUMNS), flush=True)


def targets(rows) -> list[str]:
    out = []
    for model in ("llama-3.2-1b", "llama-3.1-8b"):
        hits = [r for r in rows if r["section"] == "mlp-in" and r["model"] == model and r["rows"] == 1
                and abs(r["level"] - 0.5) < 1e-9]
        for r in hits:
            best = max(v for v in (r["speedup"], r["graph_speedup"]) if v is not None)
            out.append(f"mlp-in keep 0.5 {model} batch 1: {best:.2f}x (target >= 1.6x) "
                       f"{'HOLDS' if best >= 1.6 else 'MISSED'}")
    for r in rows:
        if r["section"] == "attn" and abs(r["level"] - 0.1) < 1e-9 and r.get("context", 0) >= 16384:
            best = max(v for v in (r["speedup"], r["graph_speedup"]) if v is not None)
            out.append(f"attn keep 0.1 {r['model']} batch {r['rows']} context {r['context']}: {best:.2f}x "
                       f"(target >= 4x) {'HOLDS' if best >= 4 else 'MISSED'}")
    return out


def write(args, rows, device_name, started: datetime.datetime | None = None, done: list[str] | None = None):
    """out/kernels-<start time>.json and .csv, each written whole and renamed over the previous section's;
    `done`: the sections run so far (complete once every one of --sections has; None: all of them)."""
    import triton

    started = started or datetime.datetime.now()
    done = args.sections.split(",") if done is None else done
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    meta = dict(command=args.command, complete=done == args.sections.split(","), device=device_name,
                torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
                date=started.isoformat(timespec="seconds"), dtype=args.dtype,
                autotune=not args.no_autotune, sections_done=list(done))
    summary = targets(rows)
    base = out / f"kernels-{started.strftime('%Y%m%d-%H%M%S')}"
    json_path, csv_path = out / f"{base.name}.json", out / f"{base.name}.csv"
    atomic_write_bytes(json_path, json.dumps(dict(meta=meta, targets=summary, rows=rows), indent=1).encode())
    text = io.StringIO(newline="")
    for k, v in meta.items():
        text.write(f"# {k}: {v}\n")
    w = csv.DictWriter(text, fieldnames=COLUMNS, extrasaction="ignore")
    w.writeheader()
    w.writerows(rows)
    atomic_write_bytes(csv_path, text.getvalue().encode())
    bench_cli.WRITTEN[:] = [json_path, csv_path]
    return base, summary


# ---------------------------------------------------------------------------------------------------
# CPU: a tiny interpreter sanity subset
# ---------------------------------------------------------------------------------------------------
def cpu_sanity() -> bool:
    from runtime.kernels import mlp as K
    from runtime.kernels.attention import quest_decode_attention
    from runtime.kernels.quant import fake_quant_rows

    g = torch.Generator().manual_seed(0)
    ok = True
    x = torch.randn(3, 40, generator=g)
    wg, wu, wo = (torch.randn(24, 40, generator=g) * 0.2, torch.randn(24, 40, generator=g) * 0.2,
                  torch.randn(40, 24, generator=g) * 0.2)
    keep = torch.tensor([0.2, 0.5, 1.0], dtype=torch.float64)
    bits = torch.tensor([16.0, 16.0, 16.0], dtype=torch.float64)
    e = _err(K.sparse_mlp(x, keep, bits, [wg, wu], [None, None], wo, None, "gated", "silu"),
             ref.mlp(x, keep, bits, [wg, wu], [None, None], wo, None, "gated", "silu"))
    print(f"  sparse mlp (3 rows, keep 0.2/0.5/1.0) max err {e:.2e}")
    ok &= e < 1e-4
    y = torch.randn(4, 33, generator=g)
    qbits = torch.tensor([5.0, 7.0, 8.0, 16.0], dtype=torch.float64)
    exact = torch.equal(fake_quant_rows(y, qbits), ref.fake_quant(y, qbits))
    print(f"  fake quant (bits 5/7/8/16) bit-exact: {exact}")
    ok &= exact
    from runtime.kernels import lowbit
    from runtime.ops import mlp_weights

    x2 = torch.randn(2, 64, generator=g)
    w2 = [torch.randn(48, 64, generator=g) * 0.2 for _ in range(2)]
    wo2 = torch.randn(64, 48, generator=g) * 0.2
    packs = mlp_weights.make_copies(w2, wo2, "gated", row_skip=True, bits=(4, 8), group_size=16)
    keep2 = torch.tensor([0.4, 0.4], dtype=torch.float64)
    for b in (8, 4):
        want = ref.mlp(x2, keep2, torch.full((2,), float(b), dtype=torch.float64), w2, [None, None], wo2, None,
                       "gated", "silu", "weight", packs, 16)
        got = lowbit.lowbit_mlp(x2, keep2, b, w2, [None, None], wo2, None, "gated", "silu", packs, 16)
        e = float(((got - want).abs() / want.abs().amax(-1, keepdim=True)).max())
        print(f"  low-bit mlp ({b} bits, 2 rows, keep 0.4) max err / row max {e:.2e}")
        ok &= e <= 2.0 ** -6  # bf16 roundings: a few ulps of the row's largest output
    kc, vc = torch.randn(2, 2, 48, 16, generator=g), torch.randn(2, 2, 48, 16, generator=g)
    pos = torch.tensor([[47], [20]])
    low, high = ref.page_stats(kc, pos[:, 0] + 1)
    q = torch.randn(2, 4, 1, 16, generator=g)
    akeep = torch.tensor([[0.1], [0.5]], dtype=torch.float64)
    e = _err(quest_decode_attention(q, kc, vc, low, high, pos, akeep, 0.25),
             ref.quest_decode(q, kc, vc, low, high, pos, akeep, 0.25))
    print(f"  quest decode attention (2 rows, keep 0.1/0.5) max err {e:.2e}")
    ok &= e < 1e-4
    return bool(ok)


RUNNERS = {"mlp-in": run_mlp_in, "mlp": run_mlp, "quant": run_quant, "lowbit": run_lowbit, "attn": run_attn}


def main(argv=None) -> int:
    args = parse_args(argv)
    if not HAS_CUDA:
        print("CUDA is not available: the GPU kernel benchmark is skipped (it needs an NVIDIA GPU).")
        print("Running a tiny correctness sanity subset of the kernels under the Triton CPU interpreter:")
        ok = cpu_sanity()
        print("sanity: OK" if ok else "sanity: FAILED")
        return 0 if ok else 1
    dev = torch.device("cuda")
    dtype = DTYPES[args.dtype]
    device_name = torch.cuda.get_device_name(dev)
    graph = not args.no_graph
    print(f"device: {device_name}   dtype: {args.dtype}   autotune: {not args.no_autotune}")
    print("  ".join(f"{c:>12}" for c in COLUMNS))
    rows: list[dict] = []
    started = datetime.datetime.now()
    done: list[str] = []
    with torch.no_grad():
        for section in args.sections.split(","):
            RUNNERS[section](args, dtype, dev, graph, rows)
            done.append(section)
            base, summary = write(args, rows, device_name, started, done)  # an interrupted run keeps the sections done
    print("\ntargets:")
    for line in summary:
        print("  " + line)
    print(f"\nwrote {base}.json and {base}.csv")
    return 0


if __name__ == "__main__":
    sys.exit(bench_cli.run(main, "kernels.py"))
