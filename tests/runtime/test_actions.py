import json

import pytest
import torch

from runtime.actions import AXES, DEFAULT_LEVELS, Action, ActionSpace


# ---------------------------------------------------------------------------------------------------
# Action
# ---------------------------------------------------------------------------------------------------
def test_action_defaults_dense_and_costs():
    a = Action()
    assert a.is_dense and (a.attn, a.mlp, a.bits) == (1.0, 1.0, 16)
    b = Action(attn=0.6, mlp=0.4, bits=5)
    assert not b.is_dense
    assert b.costs == {"attn": 0.6, "mlp": 0.4, "quant": 5 / 16}
    assert not Action(bits=7).is_dense and not Action(mlp=0.8).is_dense
    with pytest.raises(Exception):
        b.attn = 1.0  # frozen
    assert hash(Action(0.6, 0.4, 5)) == hash(b) and Action(0.6, 0.4, 5) == b


# ---------------------------------------------------------------------------------------------------
# the default grid
# ---------------------------------------------------------------------------------------------------
def test_default_space_27_actions_dense_last_and_order():
    s = ActionSpace(quant="activation")  # the paper's grid; the weight-mode default: tests/runtime/test_quant_modes.py
    assert s.axes == AXES
    assert len(s) == 27 and len(list(s)) == 27
    assert s.dense_index == 26 and s[s.dense_index].is_dense and s[-1].is_dense
    assert s[0] == Action(0.1, 0.4, 5)
    assert s[1] == Action(0.1, 0.4, 7)  # quant innermost
    assert s[3] == Action(0.1, 0.8, 5)  # then mlp
    assert s[9] == Action(0.6, 0.4, 5)  # attn outermost
    expected = [
        Action(a, m, b)
        for a in DEFAULT_LEVELS["attn"]
        for m in DEFAULT_LEVELS["mlp"]
        for b in (5, 7, 16)
    ]
    assert list(s) == expected
    for i, act in enumerate(s):
        assert s.index(act) == i
        assert s[torch.tensor(i)] == act  # 0-d int tensors index too
    with pytest.raises(IndexError):
        s[27]


def test_single_axis_space():
    s = ActionSpace(["mlp"])
    assert len(s) == 3 and s.axes == ("mlp",)
    assert list(s) == [Action(mlp=0.4), Action(mlp=0.8), Action()]
    assert s.dense_index == 2
    assert s.net_keep(0) == pytest.approx(0.4)  # disabled axes do not dilute the net keep
    assert s.levels == {"mlp": (0.4, 0.8, 1.0)}


def test_axes_canonical_order_and_custom_levels_sorted():
    s = ActionSpace(["quant", "attn"], levels={"quant": [16, 4, 8], "attn": [1.0, 0.25]})
    assert s.axes == ("attn", "quant")
    assert s.levels == {"attn": (0.25, 1.0), "quant": (4, 8, 16)}
    assert list(s) == [Action(0.25, 1.0, 4), Action(0.25, 1.0, 8), Action(0.25, 1.0, 16),
                       Action(1.0, 1.0, 4), Action(1.0, 1.0, 8), Action(1.0, 1.0, 16)]
    assert isinstance(s[0].bits, int) and isinstance(s[0].attn, float)
    assert s == ActionSpace(("attn", "quant"), {"attn": (0.25, 1), "quant": (4, 8, 16)})
    assert s.dense_index == len(s) - 1


def test_tables():
    s = ActionSpace()
    lt, ct = s.level_table(), s.cost_table()
    assert lt.dtype == torch.float64 and ct.dtype == torch.float64
    assert lt.shape == (27, 3) and ct.shape == (27, 3)
    for i, a in enumerate(s):
        assert lt[i].tolist() == [a.attn, a.mlp, float(a.bits)]
        assert ct[i].tolist() == [a.attn, a.mlp, a.bits / 16]
        assert s.net_keep(i) == pytest.approx((a.attn + a.mlp + a.bits / 16) / 3)
    assert lt[s.dense_index].tolist() == [1.0, 1.0, 16.0]
    assert s.net_keep(s.dense_index) == 1.0
    assert ActionSpace(["attn", "quant"], quant="activation").net_keep(0) == pytest.approx((0.1 + 5 / 16) / 2)


def test_index_of_foreign_action_raises():
    s = ActionSpace(["mlp"])
    with pytest.raises(ValueError, match="not in this action space"):
        s.index(Action(attn=0.1))
    assert Action(attn=0.1) not in s and Action(mlp=0.8) in s


# ---------------------------------------------------------------------------------------------------
# serialisation
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "space",
    [ActionSpace(), ActionSpace(["mlp"]), ActionSpace(["attn", "quant"], {"quant": [3, 8, 16], "attn": [0.3, 1.0]}, quant="activation")],
)
def test_json_round_trip(space):
    d = space.to_dict()
    assert d["version"] == 1
    assert ActionSpace.from_dict(d) == space
    js = space.to_json()
    json.loads(js)  # plain JSON
    back = ActionSpace.from_json(js)
    assert back == space and list(back) == list(space) and hash(back) == hash(space)
    assert torch.equal(back.level_table(), space.level_table())
    assert all(isinstance(a.bits, int) for a in back)


@pytest.mark.parametrize("version", [2, 0, None, "1"])
def test_unknown_version_rejected(version):
    d = ActionSpace().to_dict()
    if version is None:
        del d["version"]
    else:
        d["version"] = version
    with pytest.raises(ValueError, match="version") as e:
        ActionSpace.from_dict(d)
    assert "1" in str(e.value)


def test_unknown_field_rejected():
    d = ActionSpace().to_dict()
    d["extra"] = 1
    with pytest.raises(ValueError, match="extra"):
        ActionSpace.from_dict(d)


def test_equality():
    assert ActionSpace() == ActionSpace(["attn", "mlp", "quant"])
    assert ActionSpace() != ActionSpace(["mlp"])
    assert ActionSpace(["mlp"]) != ActionSpace(["mlp"], {"mlp": [0.5, 1.0]})
    assert ActionSpace() != "not a space"


# ---------------------------------------------------------------------------------------------------
# validation: every message names the bad value and the valid choices
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "axes, levels, bad, choices",
    [
        (["mlp", "ffn"], None, "'ffn'", "'quant'"),  # unknown axis
        ([], None, "empty", "'attn'"),  # empty axes
        (["mlp", "mlp"], None, "'mlp'", "'attn'"),  # duplicate axis
        (["mlp"], {"attn": [0.5, 1.0]}, "'attn'", "'mlp'"),  # levels for a disabled axis
        (["mlp"], {"ffn": [0.5, 1.0]}, "'ffn'", "'mlp'"),  # levels for an unknown axis
        (["mlp"], {"mlp": [0.0, 1.0]}, "0.0", "(0, 1]"),  # keep outside (0, 1]
        (["mlp"], {"mlp": [1.5, 1.0]}, "1.5", "(0, 1]"),
        (["attn"], {"attn": [-0.2, 1.0]}, "-0.2", "(0, 1]"),
        (["attn"], {"attn": ["0.5", 1.0]}, "'0.5'", "(0, 1]"),
        (["quant"], {"quant": [1, 16]}, "1", "2..16"),  # bits out of range
        (["quant"], {"quant": [4, 17]}, "17", "2..16"),
        (["quant"], {"quant": [4.0, 16]}, "4.0", "2..16"),  # bits not an int
        (["quant"], {"quant": [True, 16]}, "True", "2..16"),
        (["mlp"], {"mlp": []}, "empty", "1.0"),  # empty level list
        (["mlp"], {"mlp": [0.5, 0.5, 1.0]}, "0.5", "once"),  # duplicate level
        (["quant"], {"quant": [8, 8, 16]}, "8", "once"),
        (["mlp"], {"mlp": [0.4, 0.8]}, "[0.4, 0.8]", "1.0"),  # grid without dense
        (["quant"], {"quant": [4, 8]}, "[4, 8]", "16"),
        (["mlp"], {"mlp": 0.5}, "0.5", "[0.4, 0.8, 1.0]"),  # non-list level input
        ("mlp", None, "'mlp'", "'attn'"),  # non-list axes
        (["mlp"], [("mlp", [0.5, 1.0])], "[('mlp'", "'mlp'"),  # levels not a dict
    ],
)
def test_validation_messages(axes, levels, bad, choices):
    with pytest.raises(ValueError) as e:
        ActionSpace(axes, levels, quant="activation")  # weight-mode bit checks: tests/runtime/test_quant_modes.py
    msg = str(e.value)
    assert bad in msg, msg
    assert choices in msg, msg


@pytest.mark.parametrize("axes, message", [
    ([], r"^axes=\[\] is invalid: it is empty"),
    (["mlp", "ffn"], r"^axes=\['mlp', 'ffn'\] is invalid: unknown axis 'ffn'"),
    ("mlp", r"^axes='mlp' is invalid: a list of axis names"),
])
def test_axis_messages_show_the_argument_and_its_value(axes, message):
    with pytest.raises(ValueError, match=message):
        ActionSpace(axes)


def test_check_axes_names_the_callers_argument():
    from runtime.actions import check_axes

    with pytest.raises(ValueError, match=r"^actions='attn' is invalid: unknown axis 'x'"):
        check_axes(["x"], "actions", shown="attn")
    check_axes(("quant", "attn"))  # valid, any order
