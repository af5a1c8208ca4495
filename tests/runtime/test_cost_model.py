"""The cost models: analytic bytes against hand counts, interpolation, realized cost, feasibility errors."""
import math

import pytest
import torch

from runtime.actions import Action, ActionSpace
from runtime.cost_model import (
    BytesCostModel,
    CostModelError,
    LayerShape,
    MeasuredCostModel,
    check_budget,
    cost_model_from_dict,
    predicted_decode_ms,
    realized_cost,
    relative_costs,
)

LAYER = LayerShape(n_heads=4, n_kv_heads=2, head_dim=16, d_model=64, d_hidden=128, mlp_kind="gated")


def _model(mode="weight", layers=2):
    return BytesCostModel([LAYER] * layers, vocab=256, weight_bytes=4, quant_mode=mode)


def test_dense_bytes_is_every_weight_once_plus_the_kv_it_reads():
    m = _model()
    kv_len = 37
    proj = (2 * 4 + 2 * 2) * 16 * 64
    mlp = 2 * 64 * 128 + 128 * 64
    kv = 2 * 2 * kv_len * 16
    expected = 4 * (64 + 256 * 64 + 2 * (proj + mlp + kv))
    assert m.step_cost(Action(), kv_len) == expected


def test_quest_reads_kept_pages_and_all_metadata():
    m = _model(layers=1)
    kv_len = 100  # 13 pages; keep 0.1 -> 10 tokens -> 2 pages
    dense, sparse = m.step_cost(Action(), kv_len), m.step_cost(Action(attn=0.1), kv_len)
    saved_tokens = kv_len - 2 * 8
    metadata = 13 * 2 * 16
    assert dense - sparse == 4 * 2 * (2 * saved_tokens * 16 - metadata)


def test_mlp_keep_reads_only_kept_input_rows_and_low_bits_store_fewer_bytes():
    m = _model(layers=1)
    dense = m.step_cost(Action(), 8)
    pruned = m.step_cost(Action(mlp=0.4), 8)  # ceil(0.4 * 64) = 26 of 64 rows of gate and up
    assert dense - pruned == 4 * (64 - 26) * 2 * 128
    int8 = m.step_cost(Action(bits=8), 8)
    int4 = m.step_cost(Action(bits=4), 8)
    mlp_elems = 3 * 64 * 128
    assert dense - int8 == 4 * mlp_elems - (mlp_elems + (2 * 128 + 64) * 4)
    groups = math.ceil(64 / 32) * 2 * 128 + math.ceil(128 / 32) * 64
    assert dense - int4 == 4 * mlp_elems - (mlp_elems / 2 + groups * 4)
    assert int4 < int8 < dense


def test_activation_mode_bits_cost_what_dense_costs():
    m = _model(mode="activation")
    assert m.step_cost(Action(bits=5), 64) == m.step_cost(Action(), 64)


def test_relative_costs_put_dense_at_one_and_sparsity_gains_with_context():
    space = ActionSpace(["attn", "mlp"])
    m = _model()
    rel = relative_costs(m, space.actions, [64, 4096])
    assert torch.all(rel[:, -1] == 1)
    attn_only = space.index(Action(attn=0.1))
    assert rel[1, attn_only] < rel[0, attn_only] < 1


def test_realized_cost_weighs_steps_by_their_cost_and_skips_uncontrolled():
    space = ActionSpace(["attn"])
    m = _model()
    sparse = space.index(Action(attn=0.1))
    schedule = torch.tensor([[sparse, space.dense_index, sparse]])
    kv = torch.tensor([[100, 200, 300]])
    controlled = torch.tensor([[True, True, False]])
    got = realized_cost(m, space.actions, schedule, kv, controlled)
    want = (m.step_cost(Action(attn=0.1), 100) + m.step_cost(Action(), 200)) / (
        m.step_cost(Action(), 100) + m.step_cost(Action(), 200)
    )
    assert got.item() == pytest.approx(want, rel=1e-12)
    none = realized_cost(m, space.actions, schedule, kv, torch.zeros_like(controlled))
    assert torch.isnan(none).all()


def test_measured_interpolates_between_buckets_and_clamps_outside():
    m = MeasuredCostModel("cpu (2 threads)", 1, [512, 4096], [[1.0, 3.0], [2.0, 10.0]])
    assert m.step_cost_index(0, 100) == 1.0
    assert m.step_cost_index(0, 9000) == 3.0
    assert m.step_cost_index(1, 512 + (4096 - 512) // 2) == pytest.approx(6.0)


def test_measured_refuses_another_device_or_batch_unless_forced():
    m = MeasuredCostModel("cpu (2 threads)", 1, [512], [[1.0]])
    with pytest.raises(CostModelError, match="batch 1.*force=True"):
        m.check("cpu (2 threads)", 16)
    with pytest.raises(CostModelError, match="NVIDIA"):
        m.check("NVIDIA H200", 1)
    m.check("NVIDIA H200", 16, force=True)


def test_budget_outside_the_feasible_range_names_it():
    space = ActionSpace(["attn", "mlp"])
    m = _model()
    low = float(relative_costs(m, space.actions, [512])[0].min())
    assert check_budget(0.9, m, space.actions, 512) == 0.9
    for bad in (low / 2, 1.5, "x", True):
        with pytest.raises(CostModelError, match=r"feasible cost range \[0\.\d+, 1\.0\]"):
            check_budget(bad, m, space.actions, 512)


def test_dict_round_trip_and_version_check():
    for m in (_model(), MeasuredCostModel("cpu", 1, [8, 16], [[1.0, 2.0]])):
        d = m.to_dict()
        assert cost_model_from_dict(d) == m
        with pytest.raises(CostModelError, match="version"):
            cost_model_from_dict({**d, "version": 99})
    with pytest.raises(CostModelError, match="unknown cost model kind"):
        cost_model_from_dict({"kind": "flops"})


def test_decision_ms_travels_with_the_table_and_older_tables_load_without_it():
    m = MeasuredCostModel("cpu", 1, [8, 16], [[1.0, 2.0]], decision_ms=0.75)
    assert cost_model_from_dict(m.to_dict()).decision_ms == 0.75
    old = {k: v for k, v in MeasuredCostModel("cpu", 1, [8], [[1.0]]).to_dict().items() if k != "decision_ms"}
    assert cost_model_from_dict(old).decision_ms is None
    for bad in (-1.0, float("nan"), float("inf"), True, "1"):
        with pytest.raises(CostModelError, match="decision_ms must be None or a finite number >= 0"):
            MeasuredCostModel("cpu", 1, [8], [[1.0]], decision_ms=bad)


def test_predicted_decode_ms_sums_the_steps_that_ran_and_the_decisions():
    m = MeasuredCostModel("cpu", 1, [100, 200], [[1.0, 3.0], [2.0, 6.0]], decision_ms=0.5)
    # action 0 at 100 keys (1.0) and 150 keys (2.0: halfway), action 1 at 200 keys (6.0); -1 ran nothing
    assert predicted_decode_ms(m, [0, 0, -1, 1], [100, 150, 175, 200]) == pytest.approx(9.0)
    assert predicted_decode_ms(m, [0, 0, -1, 1], [100, 150, 175, 200], decisions=4) == pytest.approx(11.0)
    plain = MeasuredCostModel("cpu", 1, [100], [[1.0]])
    assert predicted_decode_ms(plain, [0, 0], [100, 120]) == 2.0
    with pytest.raises(CostModelError, match="no decision_ms: calibrate it with the policy"):
        predicted_decode_ms(plain, [0], [100], decisions=1)
    with pytest.raises(CostModelError, match="needs a measured cost model, got BytesCostModel"):
        predicted_decode_ms(_model(), [0], [100])
    with pytest.raises(CostModelError, match="differ in length"):
        predicted_decode_ms(m, [0, 1], [100])


def test_for_model_reads_the_compiled_sites():
    import solc

    sol = solc.compile(solc.load_model("tiny-llama"), verify=False)
    m = BytesCostModel.for_model(sol, quant_mode="weight")
    assert m.layers == [LAYER] * 2 and m.vocab == 256 and m.weight_bytes == 4
