"""CPU cost of solc::attention per keep level against dense attention (one decode step, all layers).

    python benchmarks/attention_cpu.py                                 # random keys, 4096 and 16384 tokens
    python benchmarks/attention_cpu.py --kv text --contexts 2048,8000  # SmolLM2's own cache of text

One decode step's attention over every layer of SmolLM2-135M's shapes (30 layers, 9 query heads, 3 KV
heads, head dim 64), batch 1, fp32, through torch.ops.solc.attention (the C kernel, cpu_attention.c):
  --kv random  random keys, values and queries per layer (what benchmarks/decode.py fills by default):
               the G query heads of a KV head pick nearly independent pages;
  --kv text    the model's own cache of the first `context` tokens of the default corpus (a dense
               prefill), and the queries of the next step, captured from the reference path; contexts
               up to the model's 8192 positions.
Keep levels and thread counts are interleaved round by round in one process; the table shows medians
and the ratio to keep 1 (dense) at the same thread count. `union` is the pages that some query head of a
KV head keeps, over the sum of the heads' kept pages (1 / G: they all keep the same pages; 1: no page
shared): what a gathering row would read if it read each shared page once (the kernel reads each
head's pages in a pass of its own: docs/runtime.md has the union form that was tried; a row whose heads
keep more than 1 / 1.6 of its pages between them runs dense-masked, keep 0.3 and 0.6 here).
To compare two versions of the kernel, use benchmarks/attention_ab.py (both in one process, by turns).
Writes JSON and CSV (with the command) under --out. Speed is never asserted by a test: this is the check.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
if __name__ == "__main__":  # before torch loads: Ctrl-C during the imports ends with one line
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("attention_cpu.py")

import torch  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package
from decode import device_name  # noqa: E402
from kernel_build import list_arg  # noqa: E402
from runtime.ops import cpu_attention, library, reference  # noqa: E402
import bench_cli  # noqa: E402

LAYERS, HQ, HKV, D = 30, 9, 3, 64  # SmolLM2-135M
SCALE = 1 / math.sqrt(D)


def _layer(q, k, v, p: int) -> tuple:
    """(q, k_cache, v_cache, p, page_min, page_max): one layer's step, with the page statistics of the
    keys <= p (what the cache holds once the op has written the new key at p), computed once."""
    low, high = reference.page_stats(k, torch.tensor([p + 1]))
    return q, k, v, p, low.contiguous(), high.contiguous()


def random_layers(context: int, seed: int = 0) -> list[tuple]:
    """`_layer`'s tuple per layer: random keys and values at 0..context, the new token at `context`."""
    g = torch.Generator().manual_seed(seed)
    S = context + 8
    out = []
    for _ in range(LAYERS):
        k = torch.randn(1, HKV, S, D, generator=g)
        v = torch.randn(1, HKV, S, D, generator=g)
        q = torch.randn(1, HQ, 1, D, generator=g)
        out.append(_layer(q, k, v, context))
    return out


@torch.no_grad()
def text_layers(context: int) -> list[tuple]:
    """The model's own cache of `context` tokens of text and the next step's queries: `_layer`'s tuple
    per layer."""
    import solc
    from solc import data as solc_data
    from runtime.dispatch import StepDispatcher
    from runtime.stepper import Stepper

    model = solc.load_model("smollm2-135m", dtype=torch.float32)
    sol = solc.compile(model, max_seq_len=context + 8)
    tok = solc.load_tokenizer("smollm2-135m")
    ids = solc_data.get_contexts(tok, split="train", length=context, max_contexts=1)
    stepper = Stepper(sol, dispatcher=StepDispatcher(sol))
    stepper.prefill(ids[:, :-1], steps=2)  # the context's last token is fed by the captured step
    captured = []
    dense_attention = library.causal_attention

    def capture(q, k, v, positions, scale):  # the reference path's dense attention: q and the visible keys
        captured.append((q.clone(), k.clone(), v.clone(), int(positions.reshape(-1)[0])))
        return dense_attention(q, k, v, positions, scale)

    fast = os.environ.get("SOLC_CPU_FAST")
    os.environ["SOLC_CPU_FAST"] = "0"
    library.causal_attention = capture
    try:
        stepper.step(ids[:, -1])
    finally:
        library.causal_attention = dense_attention
        if fast is None:
            os.environ.pop("SOLC_CPU_FAST")
        else:
            os.environ["SOLC_CPU_FAST"] = fast
    if len(captured) != LAYERS or captured[0][0].shape[1] != HQ:
        raise RuntimeError(f"captured {len(captured)} attention calls, expected {LAYERS} of {HQ} heads")
    out = []
    for q, k, v, p in captured:  # visible keys 0..p, the new one included: the cache holds them, p is its slot
        S = k.shape[2] + 8
        kc, vc = torch.zeros(1, HKV, S, D), torch.zeros(1, HKV, S, D)
        kc[:, :, :k.shape[2]], vc[:, :, :v.shape[2]] = k, v
        out.append(_layer(q, kc, vc, p))
    return out


def union_share(layers: list[tuple], keep: float) -> float:
    """Pages kept by some head of a KV head / the heads' kept pages, over every layer and KV head."""
    union = total = 0
    G = HQ // HKV
    for q, _, _, p, low, high in layers:
        n_pages = p // 8 + 1
        kept = cpu_attention._kept_page_count(p, keep)
        if kept is None:
            return 1.0
        for h in range(HKV):
            qs = q[0, h * G:(h + 1) * G, 0]
            scores = torch.maximum(qs[:, None] * high[0, h, None, :n_pages], qs[:, None] * low[0, h, None, :n_pages]).sum(-1)
            sel = scores >= scores.topk(kept, dim=-1).values[:, -1:]
            union += int(sel.any(0).sum())
            total += int(sel.sum())
    return union / total


TEXT_MAX_CONTEXT = 8184  # SmolLM2's 8192 positions, less the compile's margin


def context_ok(kv: str):
    return lambda c: 16 <= c and (kv == "random" or c <= TEXT_MAX_CONTEXT)


def context_valid(kv: str) -> str:
    return "integers >= 16" + ("" if kv == "random" else f" and <= {TEXT_MAX_CONTEXT} (the model's positions)")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--kv", choices=("random", "text"), default="random")
    p.add_argument("--contexts", default=None, help="comma-separated (default: 4096,16384 random; 2048 text)")
    p.add_argument("--keeps", default="1,0.6,0.3,0.1")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    contexts = list_arg(p, "--contexts", args.contexts or ("4096,16384" if args.kv == "random" else "2048"), int,
                        context_ok(args.kv), context_valid(args.kv))
    keeps = list_arg(p, "--keeps", args.keeps, float, lambda k: 0 < k <= 1, "numbers in (0, 1]")
    if 1.0 not in keeps:
        keeps = [1.0] + keeps
    threads = list_arg(p, "--threads", args.threads, int, lambda t: t >= 1, "integers >= 1")
    if args.rounds < 1:
        p.error(f"--rounds={args.rounds} is invalid: expected an integer >= 1")
    command = "python benchmarks/attention_cpu.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
    out = Path(args.out)
    name = f"attention_cpu_{args.kv}{'_' + args.tag if args.tag else ''}"
    bench_cli.check_outputs(p, out, name, "attention_cpu.py")  # before measuring: a foreign file is left as it is
    json_path, csv_path = out / f"{name}.json", out / f"{name}.csv"  # (not with_suffix: a tag may hold a dot)
    rows = []
    for context in contexts:
        layers = random_layers(context) if args.kv == "random" else text_layers(context)
        steps = []  # (q, k_new, v_new, caches..., positions): the new token's k/v rewrite its own slot
        for q, kc, vc, pos, low, high in layers:
            steps.append((q, kc[:, :, pos:pos + 1].clone(), vc[:, :, pos:pos + 1].clone(), kc, vc, low, high,
                          torch.tensor([[pos]])))
        samples: dict[tuple[int, float], list[float]] = {(t, k): [] for t in threads for k in keeps}
        for r in range(args.rounds + 1):  # round 0 warms up
            for t in threads:
                torch.set_num_threads(t)
                for keep in keeps:
                    kp = torch.tensor([[keep]], dtype=torch.float64)
                    start = time.perf_counter()
                    for q, kn, vn, kc, vc, low, high, pos in steps:
                        torch.ops.solc.attention(q, kn, vn, kc, vc, low, high, pos, kp, SCALE)
                    if r:
                        samples[(t, keep)].append((time.perf_counter() - start) * 1e3)
        shares = {keep: union_share(layers, keep) for keep in keeps if keep < 1}
        for t in threads:
            dense = statistics.median(samples[(t, 1.0)])
            for keep in keeps:
                ms = statistics.median(samples[(t, keep)])
                rows.append({"kv": args.kv, "context": context, "threads": t, "keep": keep, "ms": round(ms, 3),
                             "ratio_to_dense": round(ms / dense, 3), "union": round(shares.get(keep, 1.0), 3),
                             "ms_rounds": [round(x, 3) for x in samples[(t, keep)]]})
        del layers, steps
    print(f"solc::attention, {LAYERS} layers of SmolLM2-135M shapes, batch 1, fp32, {args.kv} keys; median of {args.rounds} rounds")
    print(f"{'context':>8} {'threads':>7} {'keep':>5} {'ms':>8} {'/dense':>7} {'union':>6}")
    for row in rows:
        print(f"{row['context']:>8} {row['threads']:>7} {row['keep']:>5} {row['ms']:>8.2f} {row['ratio_to_dense']:>7.3f} {row['union']:>6.3f}")
    out.mkdir(parents=True, exist_ok=True)
    meta = {"command": command, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "cpu": device_name(torch.device("cpu"))}
    json_path.write_text(json.dumps({**meta, "rows": rows}, indent=1))
    with open(csv_path, "w", newline="") as f:
        f.write(f"# command: {command}\n# device: {meta['cpu']}\n# torch: {meta['torch']}\n")
        w = csv.DictWriter(f, fieldnames=[k for k in rows[0] if k != "ms_rounds"], extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    print(f"written {json_path} and .csv")


if __name__ == "__main__":
    sys.exit(bench_cli.run(main, "attention_cpu.py"))
