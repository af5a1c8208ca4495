"""The measured cost table: one latency per action, relative to dense, used to price a schedule."""
import pytest
import torch

import solc
from runtime.costs import CostTable, calibrate_costs


def test_calibrate_measures_every_action_and_prices_schedules():
    sol = solc.compile(solc.load_model("tiny-llama"), actions=["mlp"], max_seq_len=40)
    table = calibrate_costs(sol, batch=1, context=32, repeats=3, warmup=1)
    assert sol.cost_table is table
    assert len(table.latency_ms) == len(sol.space) == 3
    assert all(ms > 0 for ms in table.latency_ms)
    assert table.relative[-1] == 1.0
    actions = torch.tensor([[0, 2, 2], [1, 1, 2]])
    rel = table.relative
    assert table.predict(actions) == pytest.approx((rel[0] + rel[2] * 3 + rel[1] * 2) / 6)
    controlled = torch.tensor([[True, False, False], [True, True, False]])
    assert table.predict(actions, controlled) == pytest.approx((rel[0] + 2 * rel[1]) / 3)
    # generate prices its realized schedule with the table
    out = sol.generate(torch.randint(0, 256, (1, 10)), budget={"mlp": 0.6}, max_new_tokens=8)
    assert out.budget["latency"] == pytest.approx(table.predict(out.actions, out.controlled))


def test_cost_table_round_trip_and_version_check():
    table = CostTable("cpu (2 threads)", 1, 256, [0.5, 0.75, 1.0])
    assert CostTable.from_dict(table.to_dict()) == table
    with pytest.raises(ValueError, match="version 99"):
        CostTable.from_dict({**table.to_dict(), "version": 99})


@pytest.fixture(scope="module")
def small_sol():
    return solc.compile(solc.load_model("tiny-llama"), actions=["mlp"], max_seq_len=40)


@pytest.mark.parametrize("kwargs, argument, message", [
    (dict(contexts=(0,)), "contexts", r"contexts=\(0,\) is invalid: a non-empty list of ints >= 1.*; 0 is not"),
    (dict(contexts=(-5, 16)), "contexts", r"contexts=\(-5, 16\) is invalid: .*; -5 is not"),
    (dict(contexts=(16.5,)), "contexts", r"16\.5 is not"),
    (dict(contexts=256), "contexts", r"contexts=256 is invalid: a non-empty list of ints"),
    (dict(contexts="256"), "contexts", r"contexts='256' is invalid"),
    (dict(contexts=[]), "contexts", r"contexts=\[\] is invalid"),
    (dict(contexts=(100,)), "contexts", r"contexts=\[100\]: none fits max_seq_len=40"),
    (dict(warmup=-1), "warmup", r"warmup=-1 is invalid: an int >= 0"),
    (dict(warmup=1.5), "warmup", r"warmup=1\.5 is invalid: an int >= 0"),
    (dict(rounds=True), "rounds", r"rounds=True is invalid: an int >= 1"),
    (dict(rounds=0), "rounds", r"rounds=0 is invalid: an int >= 1"),
    (dict(batch=0), "batch", r"batch=0 is invalid: an int >= 1"),
    (dict(seed="x"), "seed", r"seed='x' is invalid: an int in 0\.\."),
    (dict(seed=-1), "seed", r"seed=-1 is invalid: an int in 0\.\."),
    (dict(policy=3), "policy", r"policy must be a PolicyNet or an ActionSource, got int \(3\)"),
    (dict(decision_steps=0), "decision_steps", r"decision_steps must be an int >= 1, got 0"),
])
def test_calibrate_cost_model_checks_its_arguments(small_sol, kwargs, argument, message):
    kwargs = {"contexts": (16,), "rounds": 1, "warmup": 0, **kwargs}
    with pytest.raises(solc.ArgumentError, match=message) as err:
        solc.calibrate_cost_model(small_sol, **kwargs)
    assert err.value.argument == argument
    assert small_sol.cost_model is None  # nothing was measured or stored


@pytest.mark.parametrize("kwargs, argument, message", [
    (dict(context=0), "context", r"context=0 is invalid: an int in 1\.\.39 .*max_seq_len=40"),
    (dict(context=-3), "context", r"context=-3 is invalid: an int in 1\.\.39"),
    (dict(context=40), "context", r"context=40 is invalid: an int in 1\.\.39"),
    (dict(context="16"), "context", r"context='16' is invalid"),
    (dict(repeats=0), "repeats", r"repeats=0 is invalid: an int >= 1"),
    (dict(batch=0), "batch", r"batch=0 is invalid: an int >= 1"),
    (dict(warmup=-1), "warmup", r"warmup=-1 is invalid: an int >= 0"),
    (dict(seed=None), "seed", r"seed=None is invalid"),
])
def test_calibrate_costs_checks_its_arguments(small_sol, kwargs, argument, message):
    kwargs = {"context": 16, "repeats": 1, "warmup": 0, **kwargs}
    with pytest.raises(solc.ArgumentError, match=message) as err:
        calibrate_costs(small_sol, **kwargs)
    assert err.value.argument == argument
    assert small_sol.cost_table is None
