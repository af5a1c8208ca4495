"""Wall time of `sol.generate` at a cost budget against dense, and what the cost models predicted.

    python benchmarks/generate_cost.py --policy runs/default/policy.pt --budget 0.6

Issue 13, acceptance 3: batch 1, a --prompt-len token prompt (held-out Shakespeare), --new-tokens greedy
new tokens. Rows, interleaved call by call (--repeats timed rounds after one untimed round), so drift
of the shared machine hits every row alike:
  dense     generate without a budget (every step dense)
  policy    generate under the trained policy at --budget (greedy actions)
  policy_op_by_op  the same, its decisions run op by op in torch (runtime/ops/cpu_policy.op_by_op): what
            the C decision saves (the same actions, to fp32 rounding; the measured prediction prices them
            at the C decision's calibrated cost, so its error there shows the difference)
  static    generate at --budget without a policy: the cost-hull mix (runtime.schedulers.cost_fixed)
  prefill   generate of one token (prefill + one dense step): the part no action changes
Before the rows, one decision of the policy between two decode steps is timed in C and op by op, by
turns (meta "decision_ms_side_by_side"). Each row's realized cost is priced by the bytes model (what
the policy was trained with) and by a measured cost model calibrated here first
(solc.calibrate_cost_model at the prompt's length and at its end, with the policy: the table's
decision_ms is one policy decision between two decode steps). The predicted wall time of a row:
  bytes      prefill + (dense - prefill) x its realized cost (the bytes model has no milliseconds, so
             the measured dense decode anchors it)
  measured   prefill + runtime.cost_model.predicted_decode_ms: the calibrated latency of every step
             after the first (the prefill row holds that one) plus, for the policy row, its decisions
             x decision_ms (the policy's own forward, which no action's cost contains; the figure
             without it is kept as prediction_error_measured_actions_only)
  anchored   the measured prediction with its milliseconds rescaled by the dense row's measured /
             predicted decode time: the calibration runs minutes before the rows, and a shared
             machine's speed drifts by ~10% between the two
invariant 5 asks the prediction to be within 10% of the measurement.

Prints a table and writes JSON + CSV (with the command) under --out, after every timed round (meta
"complete" turns true after the last): an interrupted run keeps the rounds it finished.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

os.environ.setdefault("SOLC_CPU_FAST", "1")  # measure the CPU fast paths (on by default; SOLC_CPU_FAST=0 turns them off)
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from a checkout
if __name__ == "__main__":  # before torch loads: Ctrl-C during the imports ends with one line
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("generate_cost.py")

import argparse  # noqa: E402
import contextlib  # noqa: E402
import dataclasses  # noqa: E402
import csv  # noqa: E402
import io  # noqa: E402
import json  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from datetime import datetime, timezone  # noqa: E402

import torch  # noqa: E402

sys.path.append(str(ROOT / "benchmarks"))  # after the repo: benchmarks/training.py must not shadow the training package

import bench_cli  # noqa: E402
from runtime.budget import BudgetSpec  # noqa: E402
from runtime.errors import ArgumentError, SolcError  # noqa: E402
from solc.cache import atomic_write_bytes  # noqa: E402
from runtime.cost_model import BytesCostModel, device_name, predicted_decode_ms, realized_cost  # noqa: E402
from runtime.ops import cpu_policy  # noqa: E402
from runtime.policy import PolicyNet, PolicySource  # noqa: E402
from runtime import validation  # noqa: E402


def summarize(times: dict, outs: dict, measured, bytes_model, space, prompt_len: int) -> tuple[list[dict], str, list[str]]:
    """(rows, table, verdict) of the timed rounds so far: each row's median wall time, the realized costs
    of its last call and what the cost models predicted."""
    med = {k: statistics.median(v) for k, v in times.items()}
    decode = med["dense"] - med["prefill"]

    def predicted_decode_s(out, decisions=0):
        kv = torch.arange(out.actions.shape[1]) + prompt_len
        # step 0 runs in the prefill row
        return predicted_decode_ms(measured, out.actions[0, 1:].tolist(), kv[1:].tolist(), decisions) * 1e-3

    # the calibration ran minutes before the rows, and this machine's speed drifts by ~10% over that:
    # the anchored prediction rescales the calibrated milliseconds by the dense row's measured/predicted
    drift = decode / predicted_decode_s(outs["dense"])
    rows = []
    for name in ("dense", "policy", "policy_op_by_op", "static"):
        out = outs[name]
        kv = (torch.arange(out.actions.shape[1]) + prompt_len).expand_as(out.actions)
        cost_b = float(realized_cost(bytes_model, list(space), out.actions, kv, out.controlled).mean())
        cost_m = float(realized_cost(measured, list(space), out.actions, kv, out.controlled).mean())
        decisions = out.actions.shape[1] if name.startswith("policy") else 0  # one next_actions call per step
        decode_m = predicted_decode_s(out, decisions)
        pred_b = med["prefill"] + decode * cost_b
        pred_actions = med["prefill"] + predicted_decode_s(out)
        pred_m = med["prefill"] + decode_m
        pred_anchored = med["prefill"] + decode_m * drift
        rows.append({"row": name, "wall_ms": med[name] * 1e3, "ratio_to_dense": med[name] / med["dense"],
                     "decode_ratio": (med[name] - med["prefill"]) / decode,
                     "cost_bytes": cost_b, "cost_measured": cost_m,
                     "policy_decisions": decisions,
                     "predicted_ms_bytes": pred_b * 1e3, "predicted_ms_measured": pred_m * 1e3,
                     "predicted_ms_measured_anchored": pred_anchored * 1e3,
                     "prediction_error_bytes": pred_b / med[name] - 1, "prediction_error_measured": pred_m / med[name] - 1,
                     "prediction_error_measured_anchored": pred_anchored / med[name] - 1,
                     "prediction_error_measured_actions_only": pred_actions / med[name] - 1,
                     "actions": sorted({str(space[a]) for a in out.actions[out.controlled].tolist()}),
                     "wall_ms_all": [t * 1e3 for t in times[name]]})
    head = ["row", "wall ms", "/ dense", "decode / dense", "cost (bytes)", "cost (measured)",
            "pred. err (bytes)", "pred. err (measured)", "pred. err (measured, anchored)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        lines.append(f"| {r['row']} | {r['wall_ms']:.0f} | {r['ratio_to_dense']:.3f} | {r['decode_ratio']:.3f} | "
                     f"{r['cost_bytes']:.3f} | {r['cost_measured']:.3f} | {r['prediction_error_bytes']:+.1%} | "
                     f"{r['prediction_error_measured']:+.1%} | {r['prediction_error_measured_anchored']:+.1%} |")
    lines.append(f"| prefill (+1 step) | {med['prefill'] * 1e3:.0f} | {med['prefill'] / med['dense']:.3f} | | | | | | |")
    table = "\n".join(lines)
    pol = next(r for r in rows if r["row"] == "policy")
    verdict = [f"acceptance 3a: policy / dense wall time = {pol['ratio_to_dense']:.3f} (target <= 0.70): "
               f"{'met' if pol['ratio_to_dense'] <= 0.70 else 'MISSED'}",
               f"acceptance 3b: cost-model prediction error = {pol['prediction_error_bytes']:+.1%} (bytes), "
               f"{pol['prediction_error_measured']:+.1%} (measured, absolute), "
               f"{pol['prediction_error_measured_anchored']:+.1%} (measured, anchored on the dense row: drift "
               f"{drift:.3f}) (target within 10%): absolute "
               f"{'met' if abs(pol['prediction_error_measured']) <= 0.10 else 'MISSED'}, anchored "
               f"{'met' if abs(pol['prediction_error_measured_anchored']) <= 0.10 else 'MISSED'} "
               f"(the actions alone, absolute: {pol['prediction_error_measured_actions_only']:+.1%}; one policy "
               f"decision {measured.decision_ms:.2f} ms as calibrated between decode steps)"]
    return rows, table, verdict


def decision_side_by_side(sol, source, context: int, rounds: int) -> dict[str, float]:
    """Median ms of one decision between two dense decode steps (as calibrate_cost_model times it), the C
    decision and the op-by-op one by turns, an episode of 16 decisions each per round."""
    from runtime.costs import _decision_latency
    from runtime.dispatch import StepDispatcher

    dispatcher, times = StepDispatcher(sol), {"c": [], "op_by_op": []}
    for r in range(rounds):
        for form in times:
            with cpu_policy.op_by_op() if form == "op_by_op" else contextlib.nullcontext():
                times[form].append(_decision_latency(sol, dispatcher, source, 1, context, 1, 1 if r else 2, 16,
                                                     torch.Generator().manual_seed(r)))
    return {form: statistics.median(t) for form, t in times.items()}


def write_outputs(out_dir: Path, stem: str, meta: dict, rows: list[dict], table: str) -> None:
    """stem.json and stem.csv, each written whole and renamed over the old one (an interrupt leaves the
    previous round's files, never torn ones; meta "complete" says whether every round ran)."""
    atomic_write_bytes(out_dir / f"{stem}.json", (json.dumps({"meta": meta, "rows": rows, "table": table}, indent=2) + "\n").encode())
    text = io.StringIO(newline="")
    w = csv.writer(text)
    w.writerow([f"# {meta['command']} ({meta['device']}, {meta['date']}; rounds {meta['rounds_done']}, complete: {meta['complete']})"])
    keys = [k for k in rows[0] if k not in ("actions", "wall_ms_all")]
    w.writerow(keys)
    for r in rows:
        w.writerow([r[k] for k in keys])
    atomic_write_bytes(out_dir / f"{stem}.csv", text.getvalue().encode())
    bench_cli.WRITTEN[:] = [out_dir / f"{stem}.json", out_dir / f"{stem}.csv"]



def main(argv=None) -> int:
    import solc
    from training.grpo import GRPOConfig, build_model, load_training_contexts

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="a cost-budget policy.pt (training.grpo's default)")
    p.add_argument("--model", default="smollm2-135m", help="the base model the policy was trained for")
    p.add_argument("--corpus", default="shakespeare", help="where the prompt comes from (held-out split)")
    p.add_argument("--budget", type=float, default=0.6)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calibration-rounds", type=int, default=7)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument("--tag", default="")
    args = p.parse_args(argv)
    if args.repeats < 1:
        p.error(f"--repeats must be >= 1 (timed rounds after the untimed one), got {args.repeats}")
    shortest = max(validation.MIN_SEQ_LEN, GRPOConfig().horizon + 2)  # what load_training_contexts' config takes
    for option, value, lo, why in (("--threads", args.threads, 1, ""), ("--calibration-rounds", args.calibration_rounds, 1, ""),
                                   ("--prompt-len", args.prompt_len, shortest, " (the training corpus' shortest context)"),
                                   ("--new-tokens", args.new_tokens, 2, " (decode time = the dense call less the prefill "
                                                                        "row's one-token call)")):
        if value < lo:
            p.error(f"{option}={value} is invalid: expected an integer >= {lo}{why}")
    stem = "generate_cost_cpu" + (f"_{args.tag}" if args.tag else "")
    bench_cli.check_outputs(p, Path(args.out), stem, "generate_cost.py")
    torch.set_num_threads(args.threads)

    try:
        policy = PolicyNet.load(args.policy).eval()
    except (OSError, SolcError) as e:
        p.error(f"--policy={args.policy!r} is invalid: {e}")
    space = policy.space
    try:  # the policy's own cost range (generate checks it only after the calibration)
        if policy.config.budget is not None:
            BudgetSpec.from_dict(policy.config.budget).targets(args.budget, 1, space, "--budget")
        elif not 0 < args.budget <= 1:
            raise ArgumentError("--budget", f"--budget={args.budget} is invalid: expected a number in (0, 1]")
    except ArgumentError as e:
        p.error(str(e))
    cfg = GRPOConfig(actions=list(space.axes), levels={a: list(v) for a, v in space.levels.items()}, quant=space.quant,
                     context_length=args.prompt_len, model=args.model, corpus=args.corpus)
    end = args.prompt_len + args.new_tokens
    try:
        sol = build_model(dataclasses.replace(cfg, context_length=end + 1))  # room for the new tokens
    except ArgumentError as e:
        if e.argument != "--context-length":
            raise
        p.error(f"--prompt-len + --new-tokens = {end} does not fit --model {args.model}: {e}")
    prompt = load_training_contexts(cfg, sol.token_embedding.shape[0], split="test")[:1]
    src = PolicySource(policy, greedy=True)
    measured = solc.calibrate_cost_model(sol, contexts=(args.prompt_len, end), rounds=args.calibration_rounds,
                                         policy=src)
    sol.cost_model = None  # generate prices with the policy's (bytes) model; the measured one re-prices below
    decisions = decision_side_by_side(sol, src, args.prompt_len, args.calibration_rounds)
    print("one decision between two decode steps: " + ", ".join(f"{k} {v:.3f} ms" for k, v in decisions.items()))
    bytes_model = BytesCostModel.for_model(sol)
    def policy_op_by_op():
        with cpu_policy.op_by_op():
            return sol.generate(prompt, policy=src, budget=args.budget, max_new_tokens=args.new_tokens, eos_token_id=[])

    calls = {
        "dense": lambda: sol.generate(prompt, max_new_tokens=args.new_tokens, eos_token_id=[]),
        "policy": lambda: sol.generate(prompt, policy=src, budget=args.budget, max_new_tokens=args.new_tokens,
                                       eos_token_id=[]),
        "policy_op_by_op": lambda: policy_op_by_op(),
        "static": lambda: sol.generate(prompt, budget=args.budget, max_new_tokens=args.new_tokens, eos_token_id=[]),
        "prefill": lambda: sol.generate(prompt, max_new_tokens=1, eos_token_id=[]),
    }
    times: dict[str, list[float]] = {k: [] for k in calls}
    outs = {}
    meta = {"command": "python benchmarks/generate_cost.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])),
            "device": device_name("cpu"), "torch": torch.__version__,
            "date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "args": vars(args),
            "measured_cost_model": measured.to_dict(), "decision_ms_side_by_side": decisions}
    out_dir = Path(args.out)
    with torch.no_grad():
        for r in range(args.repeats + 1):
            for name, call in calls.items():
                t0 = time.perf_counter()
                outs[name] = call()
                dt = time.perf_counter() - t0
                if r:
                    times[name].append(dt)
            print(f"round {r}: " + ", ".join(f"{k} {v[-1] * 1e3:.0f} ms" for k, v in times.items() if v), flush=True)
            if r:  # written after every round: an interrupted run keeps the rounds it finished
                rows, table, verdict = summarize(times, outs, measured, bytes_model, space, args.prompt_len)
                meta.update(verdict=verdict, rounds_done=r, complete=r == args.repeats)
                write_outputs(out_dir, stem, meta, rows, table)
    print(table)
    print("\n".join(verdict))
    print(f"wrote {out_dir / stem}.json/.csv")
    return 0


if __name__ == "__main__":
    sys.exit(bench_cli.run(main, "generate_cost.py"))
