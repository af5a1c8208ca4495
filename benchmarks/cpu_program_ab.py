"""The eager CPU program's rewrites, side by side on SmolLM2-135M (real weights), batch 1, a synthetic
cache of CTX tokens, interleaved round by round in one process:

  plain    the direct program: direct solc calls, dropped checks and flat attributes only
  ops      + fused rotary, torch bindings, shared views (runtime/cpu_program.py)
  blocks   + each layer's attention block and MLP block as C calls (runtime/ops/cpu_block.py)
  chain    + the step's blocks, layer after layer, as one C call (runtime/ops/cpu_chain.py): the default

All four must give the same logits bit for bit (checked before timing). Env (each checked before the
model loads): T threads (default 1), CTX (default 512), ACTS (action indices, default 26,24,25,20,2; dense
is added), ROUNDS (default 8), TAG (suffix of the output file), OUT (its folder, default
benchmarks/results; a file there that is not an earlier result of this script is left as it is).

    T=1 ROUNDS=15 python benchmarks/cpu_program_ab.py    # prints the table, writes results/cpu_program_ab_t1.json
"""
import datetime
import json
import os
import shlex
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
if __name__ == "__main__":  # before torch loads: Ctrl-C during the imports ends with one line
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("cpu_program_ab.py")
sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package
import torch  # noqa: E402

import bench_cli  # noqa: E402
import solc  # noqa: E402
from decode import device_name, fill_synthetic  # noqa: E402
from runtime import cpu_program  # noqa: E402
from runtime.actions import ActionSpace  # noqa: E402
from runtime.dispatch import action_hints, specialize  # noqa: E402
from runtime.errors import ArgumentError  # noqa: E402
from runtime.ops.step_hints import step_hints  # noqa: E402
from solc.cache import atomic_write_bytes  # noqa: E402

VARIANTS = {"plain": dict(fuse=False), "ops": dict(blocks=False), "blocks": dict(chain=False), "chain": {}}
LAST, PREV = "chain", "blocks"  # the default program, and the one before its newest rewrite
ENV = ("T", "CTX", "ACTS", "ROUNDS", "TAG", "OUT")  # the options, in the order the recorded command gives them
EXTRA = 200  # cache positions past CTX (the timed steps write there)


def env_int(name: str, default: int, lo: int) -> int:
    text = os.environ.get(name, str(default))
    try:
        value = int(text)
    except ValueError:
        value = lo - 1
    if value < lo:
        raise ArgumentError(name, f"{name}={text} is invalid: expected an integer >= {lo}")
    return value


def env_actions(space) -> list[int]:
    text = os.environ.get("ACTS", "26,24,25,20,2")
    try:
        acts = [int(a) for a in text.split(",")]
    except ValueError:
        acts = []
    if not acts or not all(0 <= a < len(space) for a in acts):
        raise ArgumentError("ACTS", f"ACTS={text} is invalid: expected comma-separated action indices in 0..{len(space) - 1}")
    return acts


def check_output(out: Path) -> None:
    """`out` is absent or an earlier result of this script (its recorded command, after the environment
    assignments, runs benchmarks/cpu_program_ab.py); anything else is the user's and is left as it is."""
    if not os.path.lexists(out):
        return
    try:
        words = shlex.split(json.loads(out.read_text())["meta"]["command"])
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        words = []
    while words and "=" in words[0]:
        words.pop(0)
    if words[:2] != ["python", "benchmarks/cpu_program_ab.py"]:
        raise ArgumentError("OUT/TAG", f"OUT/TAG: {str(out)!r} exists and is not a result of "
                                       "`python benchmarks/cpu_program_ab.py`; it is left as it is: pass another TAG or OUT")


def main(argv=()) -> int:
    import argparse

    # no options (the settings are the environment variables above); --help prints this, and an argument
    # is refused instead of being ignored while the benchmark runs and writes its result
    argparse.ArgumentParser(prog="python benchmarks/cpu_program_ab.py", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter).parse_args(argv)
    threads, ctx, rounds = env_int("T", 1, 1), env_int("CTX", 512, 1), env_int("ROUNDS", 8, 1)
    acts = env_actions(ActionSpace())  # solc.compile's default grid, before the model loads
    tag = os.environ.get("TAG", "")  # a suffix, so that a rerun does not replace a file the docs quote
    folder = Path(os.environ.get("OUT") or ROOT / "benchmarks" / "results")
    if os.path.lexists(folder) and not folder.is_dir():
        raise ArgumentError("OUT", f"OUT={str(folder)!r} is invalid: expected a folder (the JSON is written into it)")
    out = folder / f"cpu_program_ab_t{threads}{'_' + tag if tag else ''}.json"
    check_output(out)
    torch.set_num_threads(threads)
    model = solc.load_model("smollm2-135m")
    sol = solc.compile(model, actions=["attn", "mlp", "quant"])
    if ctx + EXTRA > sol.max_seq_len:
        raise ArgumentError("CTX", f"CTX={ctx} is invalid: expected an integer in 1..{sol.max_seq_len - EXTRA} (the "
                                   f"model's {sol.max_seq_len} positions less the {EXTRA} the steps write)")
    acts = env_actions(sol.space)
    cache = sol.new_cache(1, ctx + EXTRA)
    layers = [cache.tensors[i:i + 4] for i in range(0, len(cache.tensors), 4)]
    fill_synthetic([(t[0], t[1]) for t in layers], ctx, torch.Generator().manual_seed(0),
                   with_stats=[(t[2], t[3]) for t in layers])
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
        for r in range(rounds):
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
    meta = dict(command=" ".join(f"{k}={shlex.quote(os.environ[k])}" for k in ENV if k in os.environ)
                + " python benchmarks/cpu_program_ab.py", device=device_name(torch.device("cpu")), threads=threads,
                torch=torch.__version__, date=datetime.datetime.now(datetime.timezone.utc).isoformat(), context=ctx,
                rounds=rounds, load_average=os.getloadavg()[0],
                unit="ms per decode step (median), ratio to the same variant's dense step")
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(out, json.dumps(dict(meta=meta, rows=rows), indent=1).encode())
    print("wrote", out)
    return 0


if __name__ == "__main__":
    sys.exit(bench_cli.run(lambda: main(sys.argv[1:]), "cpu_program_ab.py"))
