"""The quant axis' two modes in the action space: grids, validation, serialisation."""
import pytest

from runtime.actions import QUANT_LEVELS, Action, ActionSpace


def test_weight_mode_is_the_default_with_grid_4_8_16():
    s = ActionSpace()
    assert s.quant == "weight" and s.levels["quant"] == (4, 8, 16)
    assert s[0] == Action(0.1, 0.4, 4) and s.dense_index == 26
    assert s.weight_bits == (4, 8)
    assert s.cheapest_cost == {"attn": 0.1, "mlp": 0.4, "quant": 0.25}


def test_activation_mode_keeps_the_paper_grid():
    s = ActionSpace(quant="activation")
    assert s.levels["quant"] == QUANT_LEVELS["activation"] == (5, 7, 16)
    assert s.weight_bits == ()  # no weight copies in activation mode
    assert s.cheapest_cost["quant"] == 5 / 16
    assert s != ActionSpace()  # same axes, other semantics


def test_user_can_drop_a_level():
    s = ActionSpace(levels={"quant": [8, 16]})
    assert len(s) == 18 and s.weight_bits == (8,)


def test_bad_quant_mode_names_the_argument_and_choices():
    with pytest.raises(ValueError, match=r"quant='foo'.*'weight', 'activation'"):
        ActionSpace(quant="foo")


@pytest.mark.parametrize("bits", [2, 5, 7, 12])
def test_weight_mode_rejects_bits_without_a_copy(bits):
    with pytest.raises(ValueError, match=rf"quant level {bits} has no weight copy; valid choices in quant='weight' mode: \[4, 8, 16\]"):
        ActionSpace(levels={"quant": [bits, 16]})


@pytest.mark.parametrize("bits", [1, 0, -3])
def test_activation_mode_rejects_bits_below_2(bits):
    with pytest.raises(ValueError, match=rf"quant level {bits} is out of range; valid choices in quant='activation' mode: an int in 2..16"):
        ActionSpace(levels={"quant": [bits, 16]}, quant="activation")
    assert ActionSpace(levels={"quant": [2, 16]}, quant="activation").levels["quant"] == (2, 16)


def test_serialisation_carries_the_mode():
    for s in (ActionSpace(), ActionSpace(["quant"], quant="activation"), ActionSpace(levels={"quant": [8, 16]})):
        d = s.to_dict()
        assert d["quant"] == s.quant
        assert ActionSpace.from_dict(d) == s and ActionSpace.from_json(s.to_json()) == s


def test_dicts_without_a_mode_are_the_papers_activation_semantics():
    old = {"version": 1, "axes": ["attn", "mlp", "quant"], "levels": {"quant": [5, 7, 16]}}
    assert ActionSpace.from_dict(old) == ActionSpace(quant="activation")
