"""Baselines: matched budget, random search on validation / scored on test, the source registry."""
import pytest
import torch

import training.baselines as baselines
import training.evaluate as evaluate
from runtime.schedulers import Fixed, Random
from training.baselines import (
    Composite, CyclicSchedule, SharedRows, Uniform, build_source, random_schedules, random_search, target_key,
)
from training.episodes import rollout, sample_targets

T = 16


def _contexts(n, length=28, seed=0, vocab=256):
    return torch.randint(0, vocab, (n, length), generator=torch.Generator().manual_seed(seed))


def test_fixed_realizes_the_target_within_002_per_axis(tiny_sol):
    targets = sample_targets(tiny_sol.space, 11, torch.Generator().manual_seed(1))  # the training ranges
    targets = torch.cat([targets, torch.tensor([[b, b, b] for b in (0.4, 0.5, 0.6, 0.7, 0.8)], dtype=torch.float64)])
    n = targets.shape[0]
    for source in (Fixed(), Random()):
        ep = rollout(tiny_sol, _contexts(n), source, targets, group=1, horizon=T, generator=torch.Generator().manual_seed(2))
        err = (ep.budget - targets).abs()
        assert float(err.max()) <= 0.02, f"{type(source).__name__}: worst per-axis error {float(err.max()):.4f}"


def test_evaluate_ppl_matches_budget_for_fixed_and_random(tiny_sol):
    budgets = [0.4, 0.5, 0.6, 0.7, 0.8]
    entries = evaluate.make_entries(tiny_sol.space, ["fixed", "random"], budgets)
    ll, budget = evaluate.evaluate_ppl(tiny_sol, _contexts(3), entries, T, max_rows=16)
    assert ll.shape == (3, 10) and bool(torch.isfinite(ll).all())
    for j, e in enumerate(entries):
        assert float((budget[:, j] - torch.tensor(e.target)).abs().max()) <= 0.02, e
    # Random shuffles Fixed's levels: the same realized budget, a different placement
    torch.testing.assert_close(budget[:, 0::2], budget[:, 1::2], atol=1e-12, rtol=0)


def test_random_search_selects_on_validation_and_scores_on_test(tiny_sol, monkeypatch):
    cfg = evaluate.EvalConfig(policy="", model="tiny-llama", corpus="random", budgets=[0.5, 0.7], methods=["fixed", "random-search"],
                              uniform="none", context_length=28, test_contexts=3, val_contexts=2, search_n=5, mc_tasks=[], progress=False)
    splits = {"validation": _contexts(2, seed=11), "test": _contexts(3, seed=22)}
    asked = []
    monkeypatch.setattr(evaluate, "load_contexts", lambda cfg, split, n, vocab: (asked.append(split), splits[split][:n])[1])
    seen = []
    BEST = 3

    def fake_scorer(sol, contexts, schedules, horizon, max_rows=160, on_progress=None):
        seen.append(contexts.clone())
        scores = torch.zeros(schedules.shape[0], dtype=torch.float64)
        scores[BEST::5] = 1.0  # candidate BEST of every target wins
        return scores

    monkeypatch.setattr(baselines, "score_schedules", fake_scorer)
    scored_on = []
    real_ppl = evaluate.evaluate_ppl
    monkeypatch.setattr(evaluate, "evaluate_ppl", lambda sol, ctx, *a, **k: (scored_on.append(ctx.clone()), real_ppl(sol, ctx, *a, **k))[1])
    result = evaluate.run(cfg, sol=tiny_sol)

    assert asked == ["validation", "test"]
    assert len(seen) == 1 and torch.equal(seen[0], splits["validation"])  # the search saw validation only
    assert len(scored_on) == 1 and torch.equal(scored_on[0], splits["test"])  # quality is measured on test
    for b in cfg.budgets:
        key = target_key(b)
        assert result["search"][key]["best"] == BEST
        # the reported random-search perplexity is the chosen schedule run on the test contexts
        cand = random_schedules(tiny_sol.space, key, 5, T, torch.Generator().manual_seed(cfg.seed))
        assert result["search"][key]["schedule"] != []
        row = next(r for r in result["rows"] if r["method"] == "random-search" and r["budget"] == f"{b:g}")
        ep = rollout(tiny_sol, splits["test"], CyclicSchedule(torch.tensor(result["search"][key]["schedule"])), torch.tensor(key), group=1, horizon=T)
        assert row["mean_loglik"] == pytest.approx(float(ep.mean_logp().double().mean()), abs=1e-5)
        assert abs(row["attn"] - key[0]) <= 0.02 and abs(row["mlp"] - key[1]) <= 0.02 and abs(row["quant"] - key[2]) <= 0.02
    # the first target's candidates are the first draws of the seeded generator
    first = random_schedules(tiny_sol.space, target_key(0.5), 5, T, torch.Generator().manual_seed(cfg.seed))
    assert result["search"][target_key(0.5)]["schedule"] == first[BEST].tolist()


def test_random_search_picks_the_best_validation_candidate(tiny_sol):
    val = _contexts(2, seed=5)
    found = random_search(tiny_sol, val, [0.5], n=4, horizon=T, seed=0)
    r = found[target_key(0.5)]
    assert r.schedules.shape == (4, T) and r.best == int(r.scores.argmax())
    k = r.best  # its score is its mean log-lik on the validation contexts
    ep = rollout(tiny_sol, val, CyclicSchedule(r.schedules[k]), torch.tensor(target_key(0.5)), group=1, horizon=T)
    assert float(r.scores[k]) == pytest.approx(float(ep.mean_logp().double().mean()), abs=1e-5)


def test_composite_equals_separate_rollouts(tiny_sol):
    ctx = _contexts(1, length=20, seed=3)
    tgt = torch.tensor([0.5, 0.6, 0.7], dtype=torch.float64)
    sources = lambda: [Fixed(), Uniform(4), CyclicSchedule(torch.tensor([0, 26, 13]))]  # noqa: E731
    both = rollout(tiny_sol, ctx, Composite(sources()), tgt.expand(3, 3), group=3, horizon=8)
    for g, src in enumerate(sources()):
        alone = rollout(tiny_sol, ctx, src, tgt, group=1, horizon=8)
        assert torch.equal(both.actions[g::3], alone.actions)
        torch.testing.assert_close(both.logp[g::3], alone.logp, atol=1e-5, rtol=0)


def test_registry_and_sources(tiny_sol):
    space = tiny_sol.space
    assert isinstance(build_source("fixed"), Fixed) and isinstance(build_source("random"), Random)
    assert isinstance(build_source("uniform:13"), Uniform)
    for bad, match in [("nope", "valid choices"), ("uniform:x", "action index"), ("policy", "policy="), ("random-search", "searched=")]:
        with pytest.raises(ValueError, match=match):
            build_source(bad)
    with pytest.raises(ValueError, match="no random search"):
        build_source("random-search", target=0.5, searched={})
    # SharedRows: one Random schedule for every row
    src = SharedRows(Random())
    src.reset(space, 4, torch.full((4, 3), 0.5, dtype=torch.float64), 8, torch.Generator().manual_seed(0))
    z, no = torch.zeros(4, 2), torch.zeros(4, dtype=torch.bool)
    acts = torch.stack([src.next_actions(t, z, z, no) for t in range(8)], 1)
    assert (acts == acts[:1]).all()
    # forced-dense steps do not consume a cyclic schedule
    cyc = CyclicSchedule(torch.tensor([1, 2]))
    cyc.reset(space, 1, torch.ones(1, 3), 4)
    z1 = torch.zeros(1, 2)
    got = [int(cyc.next_actions(t, z1, z1, torch.tensor([d]))) for t, d in enumerate([True, False, False, False])]
    assert got == [space.dense_index, 1, 2, 1]


def test_matched_baselines_run_fixed_and_random_at_each_episodes_budget(tiny_sol):
    ctx = _contexts(3, length=24, seed=5)
    budgets = sample_targets(tiny_sol.space, 6, torch.Generator().manual_seed(1)).view(3, 2, 3)
    res = baselines.matched_baselines(tiny_sol, ctx, budgets, horizon=8, random_draws=2, max_rows=6)  # 2 chunks
    assert res.fixed_loglik.shape == res.random_loglik.shape == (3, 2)
    for c in range(3):
        for m in range(2):
            alone = rollout(tiny_sol, ctx[c : c + 1], Fixed(), budgets[c, m], group=1, horizon=8)
            torch.testing.assert_close(res.fixed_loglik[c, m], alone.mean_logp().double()[0], atol=1e-5, rtol=0)
            torch.testing.assert_close(res.fixed_budget[c, m], alone.budget.double()[0], atol=1e-12, rtol=0)
    # Random shuffles Fixed's levels: the same realized budget, different schedules (so different scores)
    torch.testing.assert_close(res.random_budget, res.fixed_budget, atol=1e-12, rtol=0)
    assert (res.random_loglik - res.fixed_loglik).abs().max() > 1e-4
    with pytest.raises(ValueError, match="random_draws must be >= 1"):
        baselines.matched_baselines(tiny_sol, ctx, budgets, horizon=8, random_draws=0)


# -- cost-budget baselines ----------------------------------------------------------------------
def test_lower_hull_by_hand():
    # points (cost, loss): 0 (0.2, 5), 1 (0.4, 4.5) above the chord 0->3, 2 (0.5, 3), 3 (0.6, 2.8) below
    # the chord 2->4? (0.5,3)->(1,2): at 0.6 the chord gives 2.8 -> collinear, dropped; 4 (1.0, 2); 5 (0.2, 6) dominated
    costs = torch.tensor([0.2, 0.4, 0.5, 0.6, 1.0, 0.2])
    losses = torch.tensor([5.0, 4.5, 3.0, 2.8, 2.0, 6.0])
    assert baselines.lower_hull(costs, losses) == [0, 2, 4]
    assert baselines.hull_mix([0, 2, 4], costs, 0.75) == (2, 4, pytest.approx(0.5))
    assert baselines.hull_mix([0, 2, 4], costs, 0.1) == (0, 0, 0.0)
    with pytest.raises(ValueError, match="two \\[N\\] tensors"):
        baselines.lower_hull(costs, losses[:3])


def test_hull_mix_realizes_the_cost_target_within_one_step(tiny_sol):
    from runtime.budget import BudgetSpec
    from runtime.cost_model import BytesCostModel

    spec = BudgetSpec.cost(BytesCostModel.for_model(tiny_sol, quant_mode="weight"), context=28)
    costs = spec.table(tiny_sol.space)[:, 0]
    losses = -torch.tensor([tiny_sol.space.net_keep(i) for i in range(len(tiny_sol.space))], dtype=torch.float64)
    hull = baselines.lower_hull(costs, losses)
    lo = float(costs.min())
    budgets = torch.tensor([lo, 0.55, 0.7, 0.85, 1.0], dtype=torch.float64).clamp(min=lo)
    targets = torch.ones(len(budgets), 3, dtype=torch.float64)
    targets[:, 0] = budgets
    ep = rollout(tiny_sol, _contexts(len(budgets)), baselines.HullMix(hull, costs), targets, group=1, horizon=T,
                 budget_spec=spec)
    step = max(float(costs[b] - costs[a]) for a, b in zip(hull, hull[1:])) / T
    # realized prices each step at the keys it attended (not the table's context): allow one step plus that
    assert float((ep.budget[:, 0] - budgets).abs().max()) <= step + 0.01
    # the schedule only uses the two hull actions around each target
    for row, b in enumerate(budgets.tolist()):
        a, c, _ = baselines.hull_mix(hull, costs, b)
        assert set(ep.actions[row].tolist()) <= {a, c}


def test_fixed_and_random_at_cost_share_levels_and_cost(tiny_sol):
    from runtime.budget import BudgetSpec
    from runtime.cost_model import BytesCostModel

    spec = BudgetSpec.cost(BytesCostModel.for_model(tiny_sol, quant_mode="weight"), context=28)
    costs = spec.table(tiny_sol.space)[:, 0]
    targets = torch.ones(4, 3, dtype=torch.float64)
    targets[:, 0] = torch.tensor([0.6, 0.7, 0.8, 0.9])
    fixed = rollout(tiny_sol, _contexts(4), baselines.AtCost(Fixed(), costs), targets, group=1, horizon=T, budget_spec=spec)
    rand = rollout(tiny_sol, _contexts(4), baselines.AtCost(Random(), costs), targets, group=1, horizon=T,
                   budget_spec=spec, generator=torch.Generator().manual_seed(0))
    # Random shuffles each axis's levels independently: per row and axis, the same multiset of levels
    # as Fixed (so the same per-axis keep); the joint actions differ, so the cost is close, not equal
    lv = tiny_sol.space.level_table()
    for f_row, r_row in zip(fixed.actions, rand.actions):
        for axis in range(lv.shape[1]):
            assert lv[f_row, axis].sort().values.tolist() == lv[r_row, axis].sort().values.tolist()
    assert float((fixed.budget[:, 0] - targets[:, 0]).abs().max()) <= 0.05
    assert float((rand.budget[:, 0] - targets[:, 0]).abs().max()) <= 0.08
