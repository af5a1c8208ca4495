"""The eager CPU program's rewrites, side by side on SmolLM2-135M (real weights), batch 1, a synthetic
cache of CTX tokens, interleaved round by round in one process:

  plain    the direct program: direct solc calls, dropped checks and flat attributes only
  ops      + fused rotary, torch bindings, shared views (runtime/cpu_program.py)
  blocks   + each layer's attention block and MLP block as C calls (runtime/ops/cpu_block.py)
  chain    + the step's blocks, layer after layer, as one C call (runtime/ops/cpu_chain.py): the default

All three must give the same logits bit for bit (checked before timing). Env: T threads, CTX, ACTS
(action indices), ROUNDS, TAG (suffix of the output file).

    T=1 ROUNDS=15 python benchmarks/cpu_program_ab.py    # prints the table, writes results/cpu_program_ab_t1.json
"""
import datetime
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package
import torch  # noqa: E402

import solc  # noqa: E402
from decode import fill_synthetic  # noqa: E402
from runtime import cpu_program  # noqa: E402
from runtime.dispatch import action_hints, specialize  # noqa: E402
from runtime.ops.step_hints import step_hints  # noqa: E402

VARIANTS = {"plain": dict(fuse=False), "ops": dict(blocks=False), "blocks": dict(chain=False), "chain": {}}
LAST, PREV = "chain", "blocks"  # the default program, and the one before its newest rewrite

torch.set_num_threads(int(os.environ.get("T", "1")))
ctx = int(os.environ.get("CTX", "512"))
model = solc.load_model("smollm2-135m")
sol = solc.compile(model, actions=["attn", "mlp", "quant"])
cache = sol.new_cache(1, ctx + 200)
layers = [cache.tensors[i:i + 4] for i in range(0, len(cache.tensors), 4)]
fill_synthetic([(t[0], t[1]) for t in layers], ctx, torch.Generator().manual_seed(0),
               with_stats=[(t[2], t[3]) for t in layers])
acts = [int(a) for a in os.environ.get("ACTS", "26,24,25,20,2").split(",")]
dense = sol.space.dense_index
if dense not in acts:
    acts.insert(0, dense)
progs = {}
for a in acts:
    g = specialize(sol.graph, a)
    for v, kw in VARIANTS.items():
        progs[(a, v)] = cpu_program.direct_cpu_calls(g, **kw)
sig = sol.signature
ids = torch.tensor([[100]])
res = {k: [] for k in progs}
with torch.no_grad():
    for a in acts:  # the same cache, position and action: every variant gives the same logits
        outs = []
        for v in VARIANTS:
            with step_hints(action_hints(sol.space, a, ctx + 1)):
                outs.append(progs[(a, v)](*sig.variant_args(ids, torch.full((1, 1), ctx), cache))[0])
        assert all(torch.equal(o, outs[0]) for o in outs), (a, [(o - outs[0]).abs().max() for o in outs])
    for r in range(int(os.environ.get("ROUNDS", "8"))):
        for (a, v), p in progs.items():
            for s in range(3):
                with step_hints(action_hints(sol.space, a, ctx + s + 1)):
                    t = time.perf_counter()
                    p(*sig.variant_args(ids, torch.full((1, 1), ctx + s), cache))
                    res[(a, v)].append((time.perf_counter() - t) * 1e3)
ms = {k: statistics.median(v) for k, v in res.items()}
rows = []
print("action                                  " + "  ".join(f"{v:>16s}" for v in VARIANTS)
      + f"   {LAST}/{PREV}  {LAST}/plain")
for a in acts:
    row = dict(action=a, label=str(sol.space[a]))
    for v in VARIANTS:
        row[f"{v}_ms"] = ms[(a, v)]
        row[f"{v}_ratio_to_dense"] = ms[(a, v)] / ms[(dense, v)]
    row[f"{LAST}_over_{PREV}"] = ms[(a, LAST)] / ms[(a, PREV)]
    row[f"{LAST}_over_plain"] = ms[(a, LAST)] / ms[(a, "plain")]
    rows.append(row)
    cells = "  ".join(f"{ms[(a, v)]:7.2f} ({row[f'{v}_ratio_to_dense']:.3f})" for v in VARIANTS)
    print(f"{a:3d} {str(sol.space[a]):36s} {cells}   {row[f'{LAST}_over_{PREV}']:.3f}        "
          f"{row[f'{LAST}_over_plain']:.3f}")
tag = os.environ.get("TAG", "")  # a suffix, so that a rerun does not replace a file the docs quote
out = ROOT / "benchmarks" / "results" / f"cpu_program_ab_t{torch.get_num_threads()}{'_' + tag if tag else ''}.json"
meta = dict(command=" ".join(f"{k}={os.environ[k]}" for k in ("T", "CTX", "ACTS", "ROUNDS", "TAG") if k in os.environ)
            + " python benchmarks/cpu_program_ab.py", device=platform.processor() or platform.machine(),
            torch=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), context=ctx,
            load_average=os.getloadavg()[0], unit="ms per decode step (median), ratio to the same variant's dense step")
out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
print("wrote", out)
