"""training.cost_eval: the cost-budget comparison's figures are what its rollouts realized."""
import pytest
import torch

import solc
from runtime.budget import BudgetSpec
from runtime.cost_model import BytesCostModel
from runtime.policy import PolicyConfig, PolicyNet
from training import cost_eval


@pytest.fixture(scope="module")
def weight_sol():
    return solc.compile(solc.load_model("tiny-llama"), max_seq_len=64)


def _policy(sol, seed):
    torch.manual_seed(seed)
    spec = BudgetSpec.cost(BytesCostModel.for_model(sol), context=28)
    return PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=2, budget=spec)).eval()


def test_rows_pair_each_policy_episode_with_baselines_at_its_realized_cost(weight_sol):
    sol = weight_sol
    g = torch.Generator().manual_seed(0)
    contexts = torch.randint(0, 256, (6, 28), generator=g)
    val = torch.randint(0, 256, (3, 28), generator=g)
    budgets = [0.7, 0.9]
    res = cost_eval.evaluate(sol, [_policy(sol, 0), _policy(sol, 1)], contexts, val, budgets, horizon=12,
                             random_draws=2, chunk=4, progress=False)
    rows = res["rows"]
    assert [(r["policy"], r["budget"]) for r in rows] == [(0, 0.7), (0, 0.9), (1, 0.7), (1, 0.9)]
    hull_costs = [h["cost"] for h in res["hull"]]
    step = max(b - a for a, b in zip(hull_costs, hull_costs[1:]))
    for r in rows:
        # the best static mix is matched to the policy's realized cost (to within one step of the mix,
        # plus the pricing at the keys really attended)
        assert abs(r["static_cost"] - r["policy_cost"]) <= step / 12 * 2 + 0.05
        assert r["static_minus_policy"]["mean"] == pytest.approx(r["static_nll"] - r["policy_nll"], abs=1e-9)
        assert r["adherence"] >= abs(r["policy_cost"] - r["budget"]) - 1e-12  # mean |x| >= |mean x|
    # the hull is cost-ascending and ends at dense; uniform references carry their own cost
    assert hull_costs == sorted(hull_costs) and res["hull"][-1]["cost"] == pytest.approx(1.0)
    dense = next(x for x in res["references"] if x["name"] == "dense")
    assert dense["cost"] == pytest.approx(1.0) and dense["net_keep"] == 1.0
    assert cost_eval.wins(rows, 0, z=float("-inf")) == 2


def test_per_axis_policies_are_refused(weight_sol):
    per_axis = PolicyNet(PolicyConfig.for_model(weight_sol, d_model=32, n_heads=2)).eval()
    ctx = torch.zeros(2, 28, dtype=torch.long)
    with pytest.raises(ValueError, match="per-axis budgets: use training.compare_baselines"):
        cost_eval.evaluate(weight_sol, [per_axis], ctx, ctx, [0.8], horizon=4, progress=False)


def test_cost_schedules_hit_the_target_to_within_one_step():
    from training.baselines import cost_schedules

    costs = torch.tensor([0.3, 0.45, 0.5, 0.8, 1.0], dtype=torch.float64)
    horizon = 12
    for target in (0.3, 0.47, 0.62, 0.9, 1.0):
        s = cost_schedules(costs, target, 20, horizon, torch.Generator().manual_seed(1))
        assert s.shape == (20, horizon) and s.min() >= 0 and s.max() < len(costs)
        mean = costs[s].mean(1)
        # each row mixes at most two actions, one at or below and one at or above the target
        for row, m in zip(s, mean):
            used = sorted(set(row.tolist()), key=lambda a: float(costs[a]))
            assert len(used) <= 2
            if len(used) == 2:
                assert costs[used[0]] <= target + 1e-12 and costs[used[1]] >= target - 1e-12
                assert abs(float(m) - target) <= float(costs[used[1]] - costs[used[0]]) / (2 * horizon) + 1e-12
            assert abs(float(m) - target) <= float(costs.max() - costs.min()) / (2 * horizon) + 1e-12
        again = cost_schedules(costs, target, 20, horizon, torch.Generator().manual_seed(1))
        assert torch.equal(s, again)
    with pytest.raises(ValueError, match=r"target cost 0.2000 outside the actions' range \[0.3000, 1.0000\]"):
        cost_schedules(costs, 0.2, 4, horizon)


def test_random_search_row_runs_the_schedule_that_won_on_validation(weight_sol):
    from training.baselines import score_schedules, search_at_cost

    sol = weight_sol
    g = torch.Generator().manual_seed(3)
    contexts = torch.randint(0, 256, (4, 28), generator=g)
    val = torch.randint(0, 256, (3, 28), generator=g)
    policy = _policy(sol, 0)
    res = cost_eval.evaluate(sol, [policy], contexts, val, [0.8], horizon=10, random_draws=0, chunk=4,
                             progress=False, search=3, seed=5)
    row = res["rows"][0]
    costs = policy.config.budget_spec.table(sol.space)[:, 0]
    # the same candidates, rescored here: the row's schedule is the validation winner ...
    found = search_at_cost(sol, val, costs, [row["policy_cost"]], n=3, horizon=10, seed=5)[0]
    assert row["search_schedule"] == [str(sol.space[a]) for a in found.schedule.tolist()]
    assert found.best == int(score_schedules(sol, val, found.schedules, 10).argmax())
    # ... and its NLL is that schedule's on the test contexts
    test_nll = -float(score_schedules(sol, contexts, found.schedule[None], 10)[0])
    assert row["search_nll"] == pytest.approx(test_nll, abs=1e-6)
    assert row["search_minus_policy"]["mean"] == pytest.approx(row["search_nll"] - row["policy_nll"], abs=1e-9)
    assert abs(row["search_cost"] - row["policy_cost"]) <= 0.1


def test_an_interrupted_evaluation_resumes_with_the_same_results(weight_sol, monkeypatch, tmp_path):
    """With a progress file, the figures of every finished chunk are saved; a rerun after an interrupt
    skips those chunks (no rollout of theirs runs again) and gives the uninterrupted run's results; the
    file is removed at the end, and one left by another evaluation is not used."""
    sol = weight_sol
    g = torch.Generator().manual_seed(1)
    contexts, val = torch.randint(0, 256, (6, 28), generator=g), torch.randint(0, 256, (3, 28), generator=g)
    policies = [_policy(sol, 0)]
    run = lambda **kw: cost_eval.evaluate(sol, policies, contexts, val, [0.8], horizon=6, random_draws=1,  # noqa: E731
                                          chunk=2, progress=False, **kw)
    whole = run()
    progress = tmp_path / "eval.json.partial.pt"
    real_rollout, calls, stop = cost_eval.rollout, [], [None]

    def rollout(sol_, ctx, *args, **kwargs):
        calls.append(ctx.clone())
        if len(calls) == stop[0]:
            raise KeyboardInterrupt
        return real_rollout(sol_, ctx, *args, **kwargs)
    monkeypatch.setattr(cost_eval, "rollout", rollout)
    stop[0] = 5  # chunk 0: the policy's rollout and the baselines', chunk 1: both, chunk 2: the policy's -> stop
    with pytest.raises(KeyboardInterrupt):
        run(progress_file=progress)
    assert torch.load(progress, weights_only=True)["contexts"]["done"] == 4
    calls.clear()
    stop[0] = None
    resumed = run(progress_file=progress)
    assert len(calls) == 2 and torch.equal(calls[0], contexts[4:])  # only the last chunk ran
    assert not progress.exists()
    for key in ("rows", "references", "hull"):
        assert resumed[key] == whole[key]

    # another evaluation's progress (other budgets) is not used: every chunk runs
    calls.clear()
    stop[0] = 5
    with pytest.raises(KeyboardInterrupt):
        run(progress_file=progress)
    calls.clear()
    stop[0] = None
    other = cost_eval.evaluate(sol, policies, contexts, val, [0.9], horizon=6, random_draws=1, chunk=2,
                               progress=False, progress_file=progress)
    assert len(calls) == 6 and other["rows"][0]["budget"] == 0.9


def test_a_file_solc_did_not_write_at_the_progress_path_is_refused_and_kept(weight_sol, tmp_path):
    from runtime.errors import ArgumentError

    g = torch.Generator().manual_seed(2)
    contexts, val = torch.randint(0, 256, (2, 28), generator=g), torch.randint(0, 256, (1, 28), generator=g)
    for content in (b"someone's notes\n", None):
        path = tmp_path / "results.json.partial.pt"
        if content is None:
            torch.save({"weights": torch.ones(2)}, path)  # a torch file, but not solc's progress
            content = path.read_bytes()
        else:
            path.write_bytes(content)
        with pytest.raises(ArgumentError, match="--json.*not an evaluation progress file solc wrote") as err:
            cost_eval.evaluate(weight_sol, [_policy(weight_sol, 0)], contexts, val, [0.8], horizon=4, random_draws=0,
                               chunk=2, progress=False, progress_file=path)
        assert err.value.argument == "--json" and path.read_bytes() == content
