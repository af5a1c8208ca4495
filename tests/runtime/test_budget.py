"""Cost budgets in generate/score: a number is a cost fraction by default, the feasible range and a
foreign measured cost model are errors, and the calibrated model is what prices the budget."""
import time

import pytest
import torch

import solc
from runtime.budget import BudgetSpec, default_cost_spec
from runtime.cost_model import (
    BytesCostModel,
    CostModelError,
    MeasuredCostModel,
    cost_model_from_dict,
    device_name,
    realized_cost,
)
from runtime.dispatch import StepDispatcher
from runtime.schedulers import ActionSource
from runtime.schedulers import cost_fixed, hull_mix


@pytest.fixture()
def sol():
    return solc.compile(solc.load_model("tiny-llama"), max_seq_len=64)


def _prompt(batch=2, length=20):
    return torch.randint(0, 256, (batch, length), generator=torch.Generator().manual_seed(0))


def _kv_lens(out, prompt_len):
    steps = out.actions.shape[1]
    return (torch.arange(steps) + prompt_len).expand_as(out.actions)  # keys each step attended, its own incl.


def test_one_number_is_a_cost_fraction_priced_by_the_bytes_model(sol):
    out = sol.generate(_prompt(), budget=0.7, max_new_tokens=32, eos_token_id=[])
    assert out.budget["budget_mode"] == "cost"
    model = BytesCostModel.for_model(sol)
    by_hand = realized_cost(model, list(sol.space), out.actions, _kv_lens(out, 20), out.controlled)
    assert out.budget["cost"] == pytest.approx(float(by_hand.mean()), abs=1e-12)
    # the static mix interleaves two hull actions: within one step of the two's cost gap of the target
    costs = default_cost_spec(sol).table(sol.space)[:, 0]  # priced at the default context
    lo, hi, _ = hull_mix(cost_fixed(sol.space, costs).hull, costs, 0.7)
    assert set(out.actions[out.controlled].tolist()) <= {lo, hi}
    # the mix is chosen on the table priced at the default context (256 keys): there it meets 0.7 to
    # within one step; the realized cost prices each step at the keys it attended (here 20..51), so it
    # is reported as what ran, not as what was asked
    n = int(out.controlled[0].sum())
    planned = costs[out.actions[out.controlled]].view(2, n).mean(1)
    assert float((planned - 0.7).abs().max()) <= float(costs[hi] - costs[lo]) / n + 1e-9


def test_per_axis_requests_keep_the_papers_budget(sol):
    out = sol.generate(_prompt(), budget=0.6, budget_mode="per-axis", max_new_tokens=32, eos_token_id=[])
    assert out.budget["budget_mode"] == "per-axis" and out.budget["attn"] == pytest.approx(0.6, abs=0.04)
    out = sol.generate(_prompt(), budget={"attn": 0.5}, max_new_tokens=32, eos_token_id=[])
    assert out.budget["budget_mode"] == "per-axis" and out.budget["attn"] == pytest.approx(0.5, abs=0.04)
    assert out.budget["mlp"] == 1.0


@pytest.mark.parametrize("bad", [0.05, 1.2, float("nan")])
def test_cost_budget_outside_the_feasible_range_names_it(sol, bad):
    low = default_cost_spec(sol).feasible_range(sol.space)[0]
    with pytest.raises(CostModelError, match=rf"feasible cost range \[{low:.3f}, 1\.0\]"):
        sol.generate(_prompt(), budget=bad, max_new_tokens=4)
    with pytest.raises(CostModelError, match=r"feasible cost range"):
        sol.score(_prompt(length=24), 20, budget=bad)


def test_a_measured_model_from_another_cpu_model_is_refused_unless_forced(sol, monkeypatch):
    """The device a CPU table is tied to names the CPU's model, not only "cpu" and the thread count: a
    table calibrated on one CPU and shipped (export) to another is refused, as one from another GPU is."""
    from runtime import cost_model

    here = device_name("cpu")
    assert cost_model.cpu_name() in here and f"({torch.get_num_threads()} threads)" in here
    lat = [[BytesCostModel.for_model(sol).step_cost(a, n) / 1e6 for n in (16, 64)] for a in sol.space]
    sol.cost_model = MeasuredCostModel(here, 2, [16, 64], lat)
    sol.generate(_prompt(), budget=0.8, max_new_tokens=4)  # this CPU: accepted
    monkeypatch.setattr(cost_model, "cpu_name", lambda: "Some Other CPU 9000")
    with pytest.raises(CostModelError, match=r"measured on 'cpu: .*' at batch 2, not on 'cpu: Some Other CPU 9000 "
                                             r"\(\d+ threads\)' at batch 2.*force=True"):
        sol.generate(_prompt(), budget=0.8, max_new_tokens=4)
    assert sol.generate(_prompt(), budget=0.8, max_new_tokens=4, force=True).budget["cost_model"] == "measured"


def test_a_measured_model_from_another_device_or_batch_is_refused_unless_forced(sol):
    A = len(sol.space)
    bytes_model = BytesCostModel.for_model(sol)
    lat = [[bytes_model.step_cost(a, n) / 1e6 for n in (16, 64)] for a in sol.space]
    sol.cost_model = MeasuredCostModel("NVIDIA H200", 1, [16, 64], lat)
    with pytest.raises(CostModelError, match="'NVIDIA H200' at batch 1.*force=True"):
        sol.generate(_prompt(), budget=0.8, max_new_tokens=4)
    sol.cost_model = MeasuredCostModel(device_name("cpu"), 4, [16, 64], lat)
    with pytest.raises(CostModelError, match="at batch 4, not .* at batch 2"):
        sol.generate(_prompt(), budget=0.8, max_new_tokens=4)
    with pytest.raises(CostModelError, match=r"solc.calibrate_cost_model\(sol, batch=2\)"):
        sol.generate(_prompt(), budget=0.8, max_new_tokens=4)
    out = sol.generate(_prompt(), budget=0.8, max_new_tokens=16, eos_token_id=[], force=True)
    by_hand = realized_cost(sol.cost_model, list(sol.space), out.actions, _kv_lens(out, 20), out.controlled)
    assert out.budget["cost"] == pytest.approx(float(by_hand.mean()), abs=1e-12)
    assert out.budget["cost_model"] == "measured"
    assert len(lat) == A
    # Nothing asked of the cost model (dense, a schedule, score without a budget): the call runs and
    # reports its cost in the bytes model instead of refusing.
    sched = torch.zeros(16, dtype=torch.long)
    for out in (sol.generate(_prompt(), max_new_tokens=16, eos_token_id=[]),
                sol.generate(_prompt(), schedule=sched, max_new_tokens=16, eos_token_id=[]),
                sol.score(_prompt(length=24), 20)):
        steps = out.actions.shape[1]
        by_hand = realized_cost(BytesCostModel.for_model(sol), list(sol.space), out.actions,
                                _kv_lens(out, out.tokens.shape[1] - steps), out.controlled)
        assert out.budget["cost_model"] == "bytes"
        assert out.budget["cost"] == pytest.approx(float(by_hand.mean()), abs=1e-12)
    sol.cost_model = None


def test_calibrate_cost_model_measures_every_action_per_bucket_and_prices_generate(sol):
    model = solc.calibrate_cost_model(sol, contexts=(32, 16, 500), rounds=2, warmup=1)
    assert sol.cost_model is model and model.contexts == [16, 32]  # 500 does not fit max_seq_len=64
    assert model.device == device_name("cpu") and model.batch == 1
    assert len(model.latency_ms) == len(sol.space) and all(len(r) == 2 and min(r) > 0 for r in model.latency_ms)
    spec = default_cost_spec(sol)
    assert spec.cost_model == model.to_dict()
    out = sol.generate(_prompt(batch=1), budget=1.0, max_new_tokens=4, eos_token_id=[])
    assert out.budget["cost"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="none fits max_seq_len=64"):
        solc.calibrate_cost_model(sol, contexts=(100,))


def test_calibration_rounds_interleave_buckets_and_actions(sol):
    """Each round times every (bucket, action) once, so a slow spell of a shared machine hits all of
    them alike rather than one bucket."""
    dispatcher = StepDispatcher(sol)
    calls = []
    step = dispatcher.step
    dispatcher.step = lambda *a, **k: calls.append((k["kv_len"], k["action"], int(a[2][0, 0]))) or step(*a, **k)
    solc.calibrate_cost_model(sol, contexts=(32, 16), rounds=2, warmup=1, dispatcher=dispatcher)
    one_round = [(c + 1, a, c) for c in (16, 32) for a in range(len(sol.space))]
    assert calls == one_round * 3  # warm-up + 2 rounds; kv_len = bucket + 1, the step at position = bucket


class _SlowSource(ActionSource):
    """Dense always, a known sleep per decision; records how many decode steps had run before each."""

    def __init__(self, steps_run, sleep_s):
        self.steps_run, self.sleep_s, self.resets, self.seen = steps_run, sleep_s, 0, []

    def reset(self, space, batch, targets, horizon, generator=None):
        super().reset(space, batch, targets, horizon, generator)
        self.resets += 1

    def next_actions(self, step, hidden, token_embedding, dense):
        self.seen.append((step, self.steps_run(), tuple(hidden.shape)))
        time.sleep(self.sleep_s)
        return torch.full((self.batch,), self.space.dense_index, dtype=torch.long)


def test_calibrating_with_a_policy_times_its_decisions_between_decode_steps(sol):
    dispatcher = StepDispatcher(sol)
    calls = []
    step = dispatcher.step
    dispatcher.step = lambda *a, **k: calls.append(1) or step(*a, **k)
    source = _SlowSource(lambda: len(calls), 0.004)
    model = solc.calibrate_cost_model(sol, contexts=(16, 32), rounds=2, warmup=1, dispatcher=dispatcher,
                                      policy=source, decision_steps=3)
    assert source.resets == 3  # warmup + rounds episodes
    assert [s for s, _, _ in source.seen] == [0, 1, 2] * 3
    runs = [n for _, n, _ in source.seen]
    assert all(b - a == 1 for a, b in zip(runs, runs[1:]))  # exactly one decode step before each decision
    assert all(shape == (1, sol.token_embedding.shape[1]) for _, _, shape in source.seen)
    assert model.decision_ms >= 4.0 and sol.cost_model is model
    assert solc.calibrate_cost_model(sol, contexts=(16,), rounds=1, warmup=0).decision_ms is None
    with pytest.raises(TypeError, match="policy must be a PolicyNet or an ActionSource, got str"):
        solc.calibrate_cost_model(sol, contexts=(16,), policy="policy.pt")
    with pytest.raises(ValueError, match="decision_steps must be an int >= 1, got 0"):
        solc.calibrate_cost_model(sol, contexts=(16,), policy=source, decision_steps=0)


def test_calibrating_with_a_policy_net_prices_its_decisions(sol):
    from runtime.policy import PolicyConfig, PolicyNet

    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=2)).eval()
    model = solc.calibrate_cost_model(sol, contexts=(16,), rounds=1, warmup=0, policy=policy, decision_steps=2)
    assert model.decision_ms > 0
    assert cost_model_from_dict(model.to_dict()) == model


def test_cost_fixed_hull_runs_from_the_cheapest_to_dense(sol):
    costs = BudgetSpec.cost(BytesCostModel.for_model(sol), context=32).table(sol.space)[:, 0]
    hull = cost_fixed(sol.space, costs).hull
    assert hull[-1] == sol.space.dense_index and float(costs[hull[0]]) == float(costs.min())
    assert all(float(costs[a]) < float(costs[b]) for a, b in zip(hull, hull[1:]))


def test_bad_budget_mode_and_force_are_named(sol):
    with pytest.raises(solc.ArgumentError, match="budget_mode='paper' is invalid"):
        sol.generate(_prompt(), budget=0.8, budget_mode="paper", max_new_tokens=2)
    with pytest.raises(solc.ArgumentTypeError, match="force='yes' is invalid: True or False"):
        sol.score(_prompt(length=24), 20, budget=0.8, force="yes")
