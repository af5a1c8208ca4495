"""The eager CPU program's rewrites, side by side: the direct program without them ("old": direct solc
calls, dropped checks and flat attributes only) and with them ("new": + fused rotary, torch bindings,
shared views), interleaved in one process on SmolLM2-135M (real weights), batch 1, a synthetic cache of
CTX tokens; checks that both give the same logits bit for bit. Env: T threads, CTX, ACTS, ROUNDS.

    T=1 ROUNDS=15 python benchmarks/cpu_program_ab.py    # prints the table, writes results/cpu_program_ab_t1.json
"""
import json, platform, datetime
import os, sys, time, statistics
from pathlib import Path
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT)); sys.path.insert(0, str(ROOT / "benchmarks"))
import torch, solc
from runtime import cpu_program
from runtime.dispatch import specialize
from runtime.ops.step_hints import step_hints
from runtime.dispatch import action_hints
from decode import fill_synthetic
torch.set_num_threads(int(os.environ.get("T", "1")))
ctx = int(os.environ.get("CTX", "512"))
model = solc.load_model("smollm2-135m")
sol = solc.compile(model, actions=["attn","mlp","quant"])
cache = sol.new_cache(1, ctx + 200)
layers = [cache.tensors[i:i + 4] for i in range(0, len(cache.tensors), 4)]
fill_synthetic([(t[0], t[1]) for t in layers], ctx, torch.Generator().manual_seed(0), with_stats=[(t[2], t[3]) for t in layers])
acts = [int(a) for a in os.environ.get("ACTS", "26,24,25,20").split(",")]
progs = {}
for a in acts:
    g = specialize(sol.graph, a)
    progs[(a, "old")] = cpu_program.direct_cpu_calls(g, fuse=False); progs[(a, "new")] = cpu_program.direct_cpu_calls(g)
sig = sol.signature
ids = torch.tensor([[100]])
res = {k: [] for k in progs}
with torch.no_grad():
    for (a, v), p in progs.items():
        with step_hints(action_hints(sol.space, a, ctx + 1)):
            out = p(*sig.variant_args(ids, torch.full((1, 1), ctx), cache))[0]
            if v == "new": assert torch.equal(out, ref), (a, (out - ref).abs().max())
            ref = out
    for r in range(int(os.environ.get("ROUNDS", "8"))):
        for (a, v), p in progs.items():
            for s in range(3):
                with step_hints(action_hints(sol.space, a, ctx + s + 1)):
                    t = time.perf_counter()
                    p(*sig.variant_args(ids, torch.full((1, 1), ctx + s), cache))
                    res[(a, v)].append((time.perf_counter() - t) * 1e3)
    d = {v: statistics.median(res[(26, v)]) for v in ("old", "new")}
    rows = []
    print("action | old ms (ratio to dense) | new ms (ratio to dense) | new/old")
    for a in acts:
        o, n = statistics.median(res[(a, "old")]), statistics.median(res[(a, "new")])
        rows.append(dict(action=a, label=str(sol.space[a]), old_ms=o, new_ms=n, old_ratio=o / d["old"],
                         new_ratio=n / d["new"], new_over_old=n / o))
        print(f"{a:3d} {str(sol.space[a]):38s} old {o:6.2f} ({o/d['old']:.3f})  new {n:6.2f} ({n/d['new']:.3f})  new/old {n/o:.3f}")
    out = ROOT / "benchmarks" / "results" / f"cpu_program_ab_t{torch.get_num_threads()}.json"
    meta = dict(command=" ".join(f"{k}={os.environ[k]}" for k in ("T", "CTX", "ACTS", "ROUNDS") if k in os.environ)
                + " python benchmarks/cpu_program_ab.py", device=platform.processor() or platform.machine(),
                torch=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), context=ctx,
                load_average=os.getloadavg()[0])
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    print("wrote", out)
