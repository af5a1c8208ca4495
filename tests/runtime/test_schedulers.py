"""Baseline action sources: matched budgets, reproducible randomness, dense steps."""
import pytest
import torch

from runtime.actions import ActionSpace
from runtime.schedulers import Fixed, Random, Schedule, axis_level_counts

SPACE = ActionSpace()


def _run(source, batch, horizon, targets, dense_steps=0, seed=0):
    source.reset(SPACE, batch, torch.as_tensor(targets, dtype=torch.float64), horizon, torch.Generator().manual_seed(seed))
    hidden = torch.zeros(batch, 4)
    out = []
    for t in range(horizon + dense_steps):
        out.append(source.next_actions(t, hidden, hidden, torch.full((batch,), t < dense_steps)))
    return torch.stack(out, 1)


def _realized(actions, dense_steps=0):
    return SPACE.cost_table()[actions[:, dense_steps:]].mean(1)  # [B, 3]


@pytest.mark.parametrize("target", [(0.3, 0.5, 0.4), (0.75, 0.9, 0.7), (0.55, 0.62, 0.5)])
def test_fixed_matches_target_within_002_per_axis(target):
    actions = _run(Fixed(), 2, 50, target)
    torch.testing.assert_close(_realized(actions), torch.tensor([target] * 2, dtype=torch.float64), atol=0.02, rtol=0)


def test_fixed_round_robins_between_the_two_nearest_levels():
    actions = _run(Fixed(), 1, 10, (0.35, 1.0, 1.0))  # attn between 0.1 and 0.6: half each
    attn = SPACE.level_table()[actions[0], 0].tolist()
    assert sorted(set(attn)) == [0.1, 0.6]
    assert attn.count(0.6) == 5
    assert all(a != b for a, b in zip(attn, attn[1:]))  # alternates, never two equal in a row


def test_axis_level_counts_clamps_outside_the_grid():
    assert axis_level_counts((0.1, 0.6, 1.0), 0.05, 8) == {0.1: 8}
    assert axis_level_counts((0.1, 0.6, 1.0), 1.0, 8) == {1.0: 8}
    assert axis_level_counts((5, 7, 16), 0.71875, 4, lambda b: b / 16) == {7: 2, 16: 2}


def test_random_has_fixed_budget_but_other_order():
    fixed = _run(Fixed(), 3, 40, (0.4, 0.7, 0.6))
    rand = _run(Random(), 3, 40, (0.4, 0.7, 0.6), seed=1)
    torch.testing.assert_close(_realized(rand), _realized(fixed))
    assert not torch.equal(rand, fixed)
    assert torch.equal(rand, _run(Random(), 3, 40, (0.4, 0.7, 0.6), seed=1))  # reproducible


def test_dense_steps_run_dense_and_do_not_consume_the_schedule():
    actions = _run(Fixed(), 1, 12, (0.35, 0.6, 0.5), dense_steps=3)
    assert actions[0, :3].tolist() == [SPACE.dense_index] * 3
    assert torch.equal(actions[:, 3:], _run(Fixed(), 1, 12, (0.35, 0.6, 0.5)))


def test_schedule_validation():
    with pytest.raises(ValueError, match="outside 0..26"):
        _run(Schedule(torch.tensor([0, 27, 1])), 1, 3, (1, 1, 1))
    with pytest.raises(ValueError, match=r"expected \[2, >= 5\]"):
        _run(Schedule(torch.zeros(3, 5, dtype=torch.long)), 2, 5, (1, 1, 1))


@pytest.mark.parametrize("actions", [[1.7] * 8, [True] * 8, "abc", None, [[[1]]]])
def test_schedule_refuses_non_integer_or_misshapen_actions(actions):
    from runtime.errors import ArgumentError

    with pytest.raises(ArgumentError, match="integer action indices") as info:
        Schedule(actions)
    assert info.value.argument == "actions"


def test_schedule_names_an_index_outside_the_space():
    from runtime.errors import ArgumentError

    with pytest.raises(ArgumentError, match="index 27, outside 0..26") as info:
        _run(Schedule([0, 27, 1]), 1, 3, (1.0, 1.0, 1.0))
    assert info.value.argument == "actions"
    assert _run(Schedule([0, 26, 1]), 1, 3, (1.0, 1.0, 1.0)).tolist() == [[0, 26, 1]]
