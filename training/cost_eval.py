"""Cost-budget evaluation: trained policies against the best static config at matched realized cost.

    python -m training.cost_eval --policies runs/a/policy.pt,runs/b/policy.pt \\
        --budgets 0.5,0.6,0.7,0.8 --contexts 256 --json benchmarks/results/cost_eval.json

Protocol (the training episodes, training/episodes.py: one dense prefill of P tokens, T controlled
teacher-forced steps; the budget is one cost fraction priced by the policies' cost model):
  1. Best static. Every uniform action is scored on `--val-contexts` validation contexts; the lower
     convex hull of (cost, NLL) is the best a static mix of whole actions can do at each cost
     (runtime.schedulers.lower_hull).
  2. Policy. On `--contexts` held-out test contexts, each policy runs greedily at each budget. Its
     REALIZED cost per episode (what ran, priced at the keys each step attended) is reported, and
     |realized - budget| is the adherence figure.
  3. Matched baselines, on the same contexts, each at the policy episode's realized cost:
       best static  HullMix: the two hull actions around that cost, interleaved;
       fixed        the paper's Fixed at the equal per-axis target of that cost (AtCost);
       random       the same levels shuffled (AtCost(Random)), `--random-draws` draws averaged;
       search       random search over schedules at a cost (`--search` candidates, 0 = off): per policy
                    and budget, the best of N random two-action schedules at the policy's mean realized
                    cost, chosen on the validation contexts, then run on the test contexts (one fixed
                    schedule, so it is matched to the mean cost, not per episode).
     A paired per-context difference of NLL (baseline - policy; > 0 means the policy wins) with its
     standard error is reported per policy and budget; a win is a lead of >= 2 standard errors.
  4. Reference points (no budget): dense, the uniform int8 / int4 weight-only actions (static torchao
     low-bit MLP weights) and TEAL-like uniform MLP sparsity at keep 0.4 / 0.6 / 0.8.

Net keep (the paper's x-axis, mean of attn keep, mlp keep and bits/16 over controlled steps) is reported
next to cost for every row. Measured wall time is benchmarks/generate_cost.py's job (it needs a quiet
machine, not an evaluation batch).
"""
from __future__ import annotations

import os
import sys

if __name__ == "__main__":  # before torch loads
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("cost_eval")

import argparse
import math
import time
from pathlib import Path
from typing import Optional

import torch

from runtime import validation
from runtime.actions import AXES, Action
from runtime.errors import ArgumentError, SolcError
from runtime.costs import realized_budget
from runtime.policy import PolicyNet, PolicySource
from runtime.schedulers import Fixed, Random, Schedule
from training.baselines import AtCost, Composite, HullMix, Uniform, hull_mix, lower_hull, search_at_cost, uniform_nll
from training.cli import ProgressFile, command_line, fingerprint, write_json
from training.episodes import rollout
from training.startup import ctrl_c_raises


def _net_keep(space, actions: torch.Tensor, controlled: torch.Tensor) -> torch.Tensor:
    """[N] the paper's net keep of each episode: the mean realized per-axis keep over the enabled axes."""
    return realized_budget(space, actions.cpu(), controlled.cpu())[:, [AXES.index(a) for a in space.axes]].mean(1)


def reference_actions(space) -> dict[str, int]:
    """Named uniform actions for the plot: dense, int8/int4 MLP weights, TEAL-like MLP sparsity."""
    out = {"dense": space.dense_index}
    dense = space[space.dense_index]
    for name, axis, level in (("int8 MLP weights", "quant", 8), ("int4 MLP weights", "quant", 4),
                              ("MLP sparsity 0.8", "mlp", 0.8), ("MLP sparsity 0.6", "mlp", 0.6),
                              ("MLP sparsity 0.4", "mlp", 0.4)):
        if axis in space.axes and level in space.levels[axis]:
            field = "bits" if axis == "quant" else axis
            out[name] = space.index(Action(**{**dense.to_dict(), field: level}))
    return out


def _paired(diff: torch.Tensor) -> dict:
    d = diff.double().reshape(-1)
    se = float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")
    return {"mean": float(d.mean()), "stderr": se, "z": float(d.mean()) / se if se > 0 else float("nan")}


def _fingerprint(sol, policies: list[PolicyNet], contexts, val_contexts, budgets, horizon, random_draws, chunk,
                 seed) -> str:
    """What an evaluation's figures depend on (the model, policies, contexts and options), as one hash."""
    options = (str(sol.space), [repr(p.config) for p in policies], list(budgets), horizon, random_draws, chunk, seed)
    return fingerprint(options, [sol.token_embedding, contexts, val_contexts]
                       + [v for p in policies for v in p.state_dict().values()])


@torch.no_grad()
def evaluate(sol, policies: list[PolicyNet], contexts: torch.Tensor, val_contexts: torch.Tensor,
             budgets: list[float], horizon: int, random_draws: int = 2, chunk: int = 8, seed: int = 0,
             progress: bool = True, search: int = 0, progress_file: Optional[Path] = None, finish: bool = True) -> dict:
    """Each policy at each budget on `contexts`, and the baselines at its realized cost (module doc).
    `progress_file`: where the figures of the contexts done so far are saved after every chunk (written
    whole, then renamed), so that a rerun of the same evaluation after an interruption resumes where it
    stopped with the same results (each chunk's randomness is seeded by its position); removed when the
    evaluation completes, or with finish=False left for the caller to remove once it has written the
    results (an interrupt in between then costs nothing)."""
    space = sol.space
    spec = policies[0].config.budget_spec
    if not spec.is_cost:
        raise ValueError("the policies were trained with per-axis budgets: use training.compare_baselines")
    for p in policies[1:]:
        if p.config.budget_spec != spec or p.space != space:
            raise ValueError("every policy must share one action space and one cost budget spec")
    costs = spec.table(space)[:, 0]
    t0 = time.perf_counter()
    saved = ProgressFile(Path(progress_file) if progress_file is not None else None,
                         _fingerprint(sol, policies, contexts, val_contexts, budgets, horizon, random_draws, chunk, seed)
                         if progress_file is not None else "", "--json", "cost_eval")
    val_nll = saved.get("val_nll")
    if val_nll is None:
        val_nll = uniform_nll(sol, val_contexts, horizon)
        saved.put("val_nll", val_nll)
    hull = lower_hull(costs, val_nll)
    if progress:
        print(f"best static: hull of {len(space)} uniform actions on {len(val_contexts)} validation contexts "
              f"-> {[str(space[i]) for i in hull]} ({time.perf_counter() - t0:.0f}s)", flush=True)

    refs = reference_actions(space)
    P, B, C = len(policies), len(budgets), len(contexts)
    G = P * B  # policy rows per context: policy-major, then budget
    base_per = 2 + random_draws  # static, fixed, random x draws
    pol_nll = torch.empty(C, G, dtype=torch.float64)
    pol_cost = torch.empty(C, G, dtype=torch.float64)
    pol_keep = torch.empty(C, G, dtype=torch.float64)
    base_nll = torch.empty(C, G, base_per, dtype=torch.float64)
    base_cost = torch.empty(C, G, base_per, dtype=torch.float64)
    base_keep = torch.empty(C, G, base_per, dtype=torch.float64)
    ref_nll = torch.empty(C, len(refs), dtype=torch.float64)
    ref_cost = torch.empty(C, len(refs), dtype=torch.float64)
    figures = {"pol_nll": pol_nll, "pol_cost": pol_cost, "pol_keep": pol_keep, "base_nll": base_nll,
               "base_cost": base_cost, "base_keep": base_keep, "ref_nll": ref_nll, "ref_cost": ref_cost}
    done = saved.get("contexts") or {"done": 0}
    if done["done"]:
        for name, t in figures.items():
            t[:done["done"]] = done[name]
    for start in range(done["done"], C, chunk):
        ctx = contexts[start:start + chunk]
        n = len(ctx)
        sources = [PolicySource(p, greedy=True) for p in policies for _ in budgets]
        targets = torch.ones(n * G, 3, dtype=torch.float64)
        targets[:, 0] = torch.tensor([b for _ in policies for b in budgets], dtype=torch.float64).repeat(n)
        ep = rollout(sol, ctx, Composite(sources), targets, group=G, horizon=horizon, budget_spec=spec)
        pol_nll[start:start + n] = -ep.mean_logp().double().cpu().view(n, G)
        pol_cost[start:start + n] = ep.budget[:, 0].cpu().view(n, G)
        pol_keep[start:start + n] = _net_keep(space, ep.actions, ep.controlled).view(n, G)

        # every baseline row targets its policy row's realized cost; then the reference rows
        base_sources = []
        for _ in range(G):
            base_sources += [HullMix(hull, costs), AtCost(Fixed(), costs)]
            base_sources += [AtCost(Random(), costs) for _ in range(random_draws)]
        base_sources += [Uniform(i) for i in refs.values()]
        GB = len(base_sources)
        btargets = torch.ones(n, GB, 3, dtype=torch.float64)
        btargets[:, : G * base_per, 0] = pol_cost[start:start + n].repeat_interleave(base_per, dim=1)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + start)
        eb = rollout(sol, ctx, Composite(base_sources), btargets.view(n * GB, 3), group=GB, horizon=horizon,
                     budget_spec=spec, generator=gen)
        nll = -eb.mean_logp().double().cpu().view(n, GB)
        cost = eb.budget[:, 0].cpu().view(n, GB)
        keep = _net_keep(space, eb.actions, eb.controlled).view(n, GB)
        m = G * base_per
        base_nll[start:start + n] = nll[:, :m].view(n, G, base_per)
        base_cost[start:start + n] = cost[:, :m].view(n, G, base_per)
        base_keep[start:start + n] = keep[:, :m].view(n, G, base_per)
        ref_nll[start:start + n], ref_cost[start:start + n] = nll[:, m:], cost[:, m:]
        saved.put("contexts", {"done": start + n, **{name: t[:start + n].clone() for name, t in figures.items()}})
        if progress:
            print(f"  {start + n}/{C} contexts ({time.perf_counter() - t0:.0f}s)", flush=True)

    searched = None
    if search > 0:
        searched = search_at_cost(sol, val_contexts, costs, [float(pol_cost[:, g].mean()) for g in range(G)], search,
                                  horizon, seed)
        schedules = torch.stack([r.schedule for r in searched])  # [G, horizon]
        search_nll = torch.empty(C, G, dtype=torch.float64)
        search_cost = torch.empty(C, G, dtype=torch.float64)
        search_keep = torch.empty(C, G, dtype=torch.float64)
        for start in range(0, C, chunk):
            ctx = contexts[start:start + chunk]
            n = len(ctx)
            ep = rollout(sol, ctx, Schedule(schedules.repeat(n, 1)), torch.ones(n * G, 3, dtype=torch.float64),
                         group=G, horizon=horizon, budget_spec=spec)
            search_nll[start:start + n] = -ep.mean_logp().double().cpu().view(n, G)
            search_cost[start:start + n] = ep.budget[:, 0].cpu().view(n, G)
            search_keep[start:start + n] = _net_keep(space, ep.actions, ep.controlled).view(n, G)
        if progress:
            print(f"  random search at cost: {search} candidates x {G} rows ({time.perf_counter() - t0:.0f}s)", flush=True)

    rows = []
    for pi in range(P):
        for bi, b in enumerate(budgets):
            g = pi * B + bi
            row = {"policy": pi, "budget": b,
                   "policy_nll": float(pol_nll[:, g].mean()), "policy_cost": float(pol_cost[:, g].mean()),
                   "policy_net_keep": float(pol_keep[:, g].mean()),
                   "adherence": float((pol_cost[:, g] - b).abs().mean())}
            splits = {"static": [0], "fixed": [1], "random": list(range(2, base_per))}
            for name, cols in splits.items():
                if not cols:  # random_draws=0
                    continue
                nll = base_nll[:, g, cols].mean(-1)
                row[f"{name}_nll"] = float(nll.mean())
                row[f"{name}_cost"] = float(base_cost[:, g, cols].mean())
                row[f"{name}_net_keep"] = float(base_keep[:, g, cols].mean())
                row[f"{name}_minus_policy"] = _paired(nll - pol_nll[:, g])
            if searched is not None:
                row["search_nll"] = float(search_nll[:, g].mean())
                row["search_cost"] = float(search_cost[:, g].mean())
                row["search_net_keep"] = float(search_keep[:, g].mean())
                row["search_minus_policy"] = _paired(search_nll[:, g] - pol_nll[:, g])
                row["search_schedule"] = [str(space[a]) for a in searched[g].schedule.tolist()]
            lo, hi, w = hull_mix(hull, costs, row["policy_cost"])
            row["static_mix"] = f"{space[lo]} / {space[hi]} (w={w:.2f})"
            rows.append(row)
    references = [{"name": name, "action": str(space[i]), "nll": float(ref_nll[:, j].mean()),
                   "cost": float(ref_cost[:, j].mean()), "net_keep": space.net_keep(i)}
                  for j, (name, i) in enumerate(refs.items())]
    if finish:
        saved.finish()
    return {"rows": rows, "references": references,
            "hull": [{"action": str(space[i]), "cost": float(costs[i]), "val_nll": float(val_nll[i])} for i in hull],
            "uniform": [{"action": str(space[i]), "cost": float(costs[i]), "val_nll": float(val_nll[i])}
                        for i in range(len(space))],
            "seconds": time.perf_counter() - t0}


def wins(rows: list[dict], policy: int, baseline: str = "static", z: float = 2.0) -> int:
    """Budgets at which `policy` leads `baseline` by >= z standard errors (paired)."""
    return sum(1 for r in rows if r["policy"] == policy and r[f"{baseline}_minus_policy"]["z"] >= z)


def table(result: dict) -> str:
    lines = ["| policy | budget | realized cost | |realized - budget| | policy NLL | static NLL (cost) | "
             "static - policy (SE) | fixed - policy (SE) | random - policy (SE) | search - policy (SE) | policy net keep |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        d = lambda k: f"{r[k]['mean']:+.4f} ({r[k]['stderr']:.4f})" if k in r else "n/a"  # noqa: E731
        lines.append(f"| {r['policy']} | {r['budget']:.2f} | {r['policy_cost']:.3f} | {r['adherence']:.3f} | "
                     f"{r['policy_nll']:.4f} | {r['static_nll']:.4f} ({r['static_cost']:.3f}) | {d('static_minus_policy')} | "
                     f"{d('fixed_minus_policy')} | {d('random_minus_policy')} | {d('search_minus_policy')} | {r['policy_net_keep']:.3f} |")
    lines += ["", "| reference (uniform) | action | cost | net keep | NLL |", "|---|---|---:|---:|---:|"]
    for ref in result["references"]:
        lines.append(f"| {ref['name']} | {ref['action']} | {ref['cost']:.3f} | {ref['net_keep']:.3f} | {ref['nll']:.4f} |")
    lines += ["", "| best-static hull | cost | validation NLL |", "|---|---:|---:|"]
    lines += [f"| {h['action']} | {h['cost']:.3f} | {h['val_nll']:.4f} |" for h in result["hull"]]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training.cost_eval", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policies", required=True, help="comma-separated policy.pt files (one cost spec, one space)")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--corpus", default="shakespeare", help="corpus ('random' for tests)")
    p.add_argument("--budgets", default="0.5,0.6,0.7,0.8", help="cost fractions, comma separated, in the policies' feasible range")
    p.add_argument("--contexts", type=int, default=256, help="held-out test contexts (a seeded sample), >= 1")
    p.add_argument("--val-contexts", type=int, default=64, help="validation contexts that fit the best-static hull, >= 1")
    p.add_argument("--context-length", type=int, default=256, help=f"tokens per context, >= --horizon + 2 and {validation.MIN_SEQ_LEN}")
    p.add_argument("--horizon", type=int, default=16, help="controlled steps per episode, >= 1")
    p.add_argument("--random-draws", type=int, default=2, help="Random baseline draws per episode, >= 0 (0: no Random)")
    p.add_argument("--search", type=int, default=16,
                   help="random-search candidates per policy and budget, scored on the validation contexts (0: off)")
    p.add_argument("--chunk", type=int, default=8, help="contexts per rollout, >= 1 (memory: chunk x rows x cache)")
    p.add_argument("--seed", type=int, default=0, help=f"0 to {SEED_MAX}")
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--json", help="write the results here (with the command); the contexts done so far are kept "
                                  "in JSON.partial.pt, and a rerun of the same command resumes from there")
    return p


SEED_MAX = 2**32 - 1  # the baselines' generators are seeded with seed * 1_000_003 + context offset


def check_args(args) -> tuple[list[float], list[PolicyNet]]:
    """Every option, before the model loads: (budgets, policies), or an ArgumentError naming the option."""
    from training.evaluate import load_policy

    for flag, lo in (("contexts", 1), ("val_contexts", 1), ("horizon", 1), ("random_draws", 0), ("search", 0),
                     ("chunk", 1), ("threads", 0)):
        validation.check_int("--" + flag.replace("_", "-"), getattr(args, flag), lo)
    validation.check_int("--seed", args.seed, 0, SEED_MAX)
    validation.check_int("--context-length", args.context_length, max(validation.MIN_SEQ_LEN, args.horizon + 2), None,
                         f"at least --horizon + 2 = {args.horizon + 2} and {validation.MIN_SEQ_LEN}")
    try:
        budgets = [float(x) for x in args.budgets.split(",")]
    except ValueError:
        raise ArgumentError("--budgets", f"--budgets {args.budgets!r} is invalid: comma-separated cost fractions, "
                                         "e.g. 0.5,0.6") from None
    for b in budgets:
        validation.check_real("--budgets", b, 0.0, 1.0, lo_open=True)
    if args.json:
        parent = Path(args.json).resolve().parent
        if Path(args.json).is_dir() or not parent.is_dir() or not os.access(parent, os.W_OK):
            raise ArgumentError("--json", f"--json {args.json} is invalid: a file in an existing, writable directory")
    paths = [x.strip() for x in args.policies.split(",") if x.strip()]
    if not paths:
        raise ArgumentError("--policies", f"--policies {args.policies!r} is invalid: comma-separated policy.pt files")
    policies = [load_policy(x, argument="--policies") for x in paths]
    if not policies[0].config.budget_spec.is_cost:
        raise ArgumentError("--policies", f"--policies {paths[0]} was trained with per-axis budgets: compare it with "
                                          "python -m training.compare_baselines")
    if any(q.config.budget_spec != policies[0].config.budget_spec or q.space != policies[0].space for q in policies[1:]):
        raise ArgumentError("--policies", f"--policies {args.policies}: every policy must share one action space and "
                                          "one cost budget spec")
    return budgets, policies


def main(argv=None) -> int:
    ctrl_c_raises()  # torch has loaded: Ctrl-C is a KeyboardInterrupt
    args = _parser().parse_args(argv)
    try:
        return _run(args, argv)
    except SolcError as e:
        print(f"cost_eval: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        partial = Path(args.json + ".partial.pt") if args.json else None
        kept = (f"the contexts done so far are kept in {partial}: the same command resumes there"
                if partial is not None and partial.is_file() else "nothing was kept (--json keeps finished contexts)")
        print(f"\ncost_eval: interrupted; {kept}", file=sys.stderr)
        return 130
    except OSError as e:  # --json's directory full or read-only
        print(f"cost_eval: error: cannot write --json {args.json}: {e}", file=sys.stderr)
        return 1


def _run(args, argv) -> int:
    from training.grpo import GRPOConfig, build_model, load_training_contexts

    budgets, policies = check_args(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    space = policies[0].space
    cfg = GRPOConfig(model=args.model, corpus=args.corpus, context_length=args.context_length, actions=list(space.axes),
                     levels={a: list(v) for a, v in space.levels.items()}, quant=space.quant, horizon=args.horizon)
    sol = build_model(cfg)
    policies = [q.to(sol.token_embedding.device).eval() for q in policies]
    lo, hi = policies[0].config.budget_spec.feasible_range(space)
    bad = [b for b in budgets if not lo <= b <= hi]
    if bad:
        raise ArgumentError("--budgets", f"--budgets {bad} outside the feasible cost range [{lo:.3f}, {hi:.1f}]")

    def pick(split, n, salt):
        pool = load_training_contexts(cfg, sol.token_embedding.shape[0], split=split)
        if n > len(pool):
            flag = "--contexts" if split == "test" else "--val-contexts"
            raise ArgumentError(flag, f"{flag} {n} is invalid: the {split} split has {len(pool)} contexts")
        return pool[torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed + salt))[:n]]

    contexts, val = pick("test", args.contexts, 0), pick("validation", args.val_contexts, 1)
    partial = Path(args.json + ".partial.pt") if args.json else None
    result = evaluate(sol, policies, contexts, val, budgets, args.horizon, args.random_draws, args.chunk, args.seed,
                      search=args.search, progress_file=partial, finish=False)
    command = command_line("training.cost_eval", argv)
    print(table(result))
    for i in range(len(policies)):
        print(f"policy {i}: beats best static by >= 2 SE at {wins(result['rows'], i)}/{len(budgets)} budgets; "
              f"max mean |realized - budget| = {max(r['adherence'] for r in result['rows'] if r['policy'] == i):.3f}")
    if args.json:
        write_json(args.json, {"command": command, "args": vars(args), "result": result})
        partial.unlink(missing_ok=True)  # only now: an interrupt before the JSON was whole keeps every context
    return 0


if __name__ == "__main__":
    sys.exit(main())
