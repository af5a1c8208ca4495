"""Quick held-out check of a trained policy against Fixed and Random at matched realized budget.

    python -m training.compare_baselines --policy runs/default/policy.pt --budget 0.6 --contexts 16

Protocol (the same teacher-forced episodes as training, training/episodes.py): held-out contexts, one
dense prefill each, T controlled steps. The policy runs first (greedy, and/or sampled at a
temperature); the budget each of its episodes REALIZED per axis (from the actions that ran) becomes
that episode's target for Fixed (round-robin between the two nearest levels) and Random (the same
levels shuffled, several draws), so every comparison is at matched per-episode, per-axis budget (up to
whole-step rounding; the realized budgets are reported). Score: mean log-likelihood of the T scored
tokens (higher is better) and its exp(-x) perplexity.

This is a small sanity comparison; the evaluation command with Pareto fronts is training/evaluate.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

from runtime import validation
from runtime.actions import AXES
from runtime.errors import ArgumentError
from runtime.generate import budget_targets
from runtime.policy import PolicyFileError, PolicyNet, PolicySource
from solc.cache import check_replaceable_result
from training.baselines import matched_baselines
from training.cli import command_line, write_json
from training.episodes import rollout


def _summary(loglik: torch.Tensor, budget: torch.Tensor, space) -> dict:
    """Mean log-lik, ppl and realized budgets of episodes: loglik [N], budget [N, 3]."""
    ll = loglik.double().reshape(-1)
    budget = budget.double().reshape(-1, 3)
    cols = [AXES.index(a) for a in space.axes]
    out = {
        "mean_loglik": float(ll.mean()),
        "ppl": math.exp(-float(ll.mean())),
        "net_keep": float(budget[:, cols].mean()),
        "episodes": len(ll),
    }
    for i, axis in enumerate(AXES):
        if axis in space.axes:
            out[f"{axis}_budget"] = float(budget[:, i].mean())
    return out


def compare(
    sol,
    policy: PolicyNet,
    contexts: torch.Tensor,
    targets,
    horizon: int = 16,
    modes=("greedy", "sample"),
    samples: int = 4,
    temperature: float = 1.0,
    random_draws: int = 4,
    seed: int = 0,
) -> dict:
    """Policy vs Fixed vs Random at the policy's realized per-episode budgets. Returns a dict per mode."""
    space = sol.space
    C = contexts.shape[0]
    results: dict = {}
    for mode in modes:
        greedy = mode == "greedy"
        group = 1 if greedy else samples
        gens = [torch.Generator().manual_seed(seed * 100_003 + c) for c in range(C)]
        tgt = budget_targets(targets, C).clone()
        for i, axis in enumerate(AXES):  # disabled axes always run dense: their target is 1.0
            if axis not in space.axes:
                tgt[:, i] = 1.0
        src = PolicySource(policy, greedy=greedy, temperature=temperature)
        pol = rollout(sol, contexts, src, tgt, group=group, horizon=horizon, generator=None if greedy else gens)
        pol_ll = pol.mean_logp().double().cpu().view(C, group)
        base = matched_baselines(sol, contexts, pol.budget.view(C, group, 3), horizon, random_draws, seed + 1)
        diff_f = (pol_ll - base.fixed_loglik).reshape(-1)
        diff_r = (pol_ll - base.random_loglik).reshape(-1)
        se = lambda d: float(d.std() / math.sqrt(len(d))) if len(d) > 1 else float("nan")  # noqa: E731
        results[mode] = {
            "policy": _summary(pol_ll, pol.budget, space),
            "fixed": _summary(base.fixed_loglik, base.fixed_budget, space),
            "random": _summary(base.random_loglik, base.random_budget, space),
            "policy_minus_fixed": {"mean": float(diff_f.mean()), "stderr": se(diff_f)},
            "policy_minus_random": {"mean": float(diff_r.mean()), "stderr": se(diff_r)},
        }
    return results


def _table(results: dict) -> str:
    lines = ["| mode | source | mean log-lik | ppl | net keep | attn | mlp | bits/16 |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for mode, r in results.items():
        for name in ("policy", "fixed", "random"):
            s = r[name]
            lines.append(
                f"| {mode} | {name} | {s['mean_loglik']:.4f} | {s['ppl']:.2f} | {s['net_keep']:.3f} | "
                f"{s.get('attn_budget', float('nan')):.3f} | {s.get('mlp_budget', float('nan')):.3f} | {s.get('quant_budget', float('nan')):.3f} |"
            )
    lines.append("")
    for mode, r in results.items():
        for base in ("fixed", "random"):
            d = r[f"policy_minus_{base}"]
            lines.append(f"{mode}: policy - {base} = {d['mean']:+.4f} nats/token (stderr {d['stderr']:.4f})")
    return "\n".join(lines)


def _parse_budget(text: str) -> list[float]:
    """--budget: one keep fraction for every axis, or three (attn, mlp, bits/16), each in (0, 1]."""
    try:
        budget = [float(x) for x in text.split(",")]
    except ValueError:
        budget = []
    if len(budget) not in (1, 3) or not all(0.0 < b <= 1.0 for b in budget):
        raise ArgumentError("--budget", f"--budget={text!r} is invalid: one number in (0, 1] for every axis, or "
                                        "three (attn,mlp,bits16)")
    return budget


def main(argv=None) -> int:
    import solc
    from training.grpo import GRPOConfig, build_model, load_training_contexts

    p = argparse.ArgumentParser(prog="python -m training.compare_baselines", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--policy", required=True, help="policy.pt written by training.grpo")
    p.add_argument("--model", default="smollm2-135m", help="base model the policy was trained on")
    p.add_argument("--corpus", default="shakespeare", help="corpus ('random' for tests)")
    p.add_argument("--split", default="validation", help="held-out split: validation | test")
    p.add_argument("--contexts", type=int, default=16, help="held-out contexts (a seeded sample of the split)")
    p.add_argument("--context-length", type=int, default=256)
    p.add_argument("--horizon", type=int, default=16)
    p.add_argument("--budget", default="0.6", help="target: one number for all axes, or attn,mlp,bits16")
    p.add_argument("--modes", default="greedy,sample", help="policy modes: greedy and/or sample")
    p.add_argument("--samples", type=int, default=4, help="sampled schedules per context (mode 'sample')")
    p.add_argument("--temperature", type=float, default=1.0, help="policy temperature for mode 'sample'")
    p.add_argument("--random-draws", type=int, default=4, help="Random baseline draws per episode")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", help="also write the results here (with the command)")
    args = p.parse_args(argv)
    try:  # before anything loads: a refusal costs nothing
        for flag in ("contexts", "context_length", "horizon", "samples", "random_draws"):
            validation.check_int("--" + flag.replace("_", "-"), getattr(args, flag), 1)
        validation.check_real("--temperature", args.temperature, 0.0, lo_open=True)
        budget = _parse_budget(args.budget)
        modes = [m.strip() for m in args.modes.split(",")]
        if not modes or any(m not in ("greedy", "sample") for m in modes):
            raise ArgumentError("--modes", f"--modes={args.modes!r} is invalid: greedy and/or sample, comma-separated")
        if args.json:
            check_replaceable_result(Path(args.json), "python -m training.compare_baselines", "--json")
        policy = PolicyNet.load(args.policy)
    except (ArgumentError, FileNotFoundError, IsADirectoryError, PolicyFileError) as e:
        p.error(str(e))
    if policy.config.budget_spec.is_cost:
        p.error(f"--policy {args.policy} was trained for a cost budget: compare it at matched cost with "
                f"python -m training.cost_eval --policies {args.policy} --budgets {args.budget}")
    space = policy.space
    cfg = GRPOConfig(model=args.model, corpus=args.corpus, context_length=args.context_length, actions=list(space.axes),
                     levels={a: list(v) for a, v in space.levels.items()}, horizon=args.horizon)
    sol = build_model(cfg)
    policy = policy.to(sol.token_embedding.device)
    pool = load_training_contexts(cfg, sol.token_embedding.shape[0], split=args.split)
    pick = torch.randperm(len(pool), generator=torch.Generator().manual_seed(args.seed))[: args.contexts]
    contexts = pool[pick]
    targets = budget[0] if len(budget) == 1 else budget
    t0 = time.perf_counter()
    results = compare(sol, policy, contexts, targets, args.horizon, modes,
                      args.samples, args.temperature, args.random_draws, args.seed)
    command = command_line("training.compare_baselines", argv)
    print(_table(results))
    print(f"({len(contexts)} held-out {args.split} contexts, {time.perf_counter() - t0:.0f}s)")
    if args.json:
        write_json(args.json, {"command": command, "args": vars(args), "results": results})
    return 0


if __name__ == "__main__":
    sys.exit(main())
