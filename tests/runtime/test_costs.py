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
