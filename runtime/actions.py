"""The action space: one level per enabled efficiency axis, their Cartesian product indexed 0..A-1.

    space = ActionSpace()                      # 27 actions: attn x mlp x weight bits {4, 8, 16}, dense last
    space = ActionSpace(quant="activation")    # the paper's 27-action grid (activation bits {5, 7, 16})
    space = ActionSpace(["mlp"])               # 3 actions: mlp keep 0.4 / 0.8 / 1.0, attn and bits dense
    space = ActionSpace(["attn", "quant"], levels={"quant": [8, 16]})
    space[i] -> Action(attn=..., mlp=..., bits=...);  space.index(action) -> i
    space.level_table()  # float64 [A, 3]: attn keep, mlp keep, bits   (what the solc:: ops read)
    space.cost_table()   # float64 [A, 3]: attn keep, mlp keep, bits/16 (what the budget counts)

Axes are "attn" (Quest token keep fraction), "mlp" (MLP input channel keep fraction) and "quant"
(a bit-width); see DESIGN.md "The three efficiency axes". The quant mode says what the bits mean:
"weight" (default, grid {4, 8, 16}): the MLP linears use int8 / int4 weight copies made at compile
time; "activation" (the paper's, grid {5, 7, 16}): the MLP output is fake-quantized per token. The dense level
(1.0 for keep fractions, 16 bits) must be on every enabled axis' grid; a disabled axis is fixed at it.

Serialisation follows torchao's config convention: a small dict with a `"version"` field, checked on
load, so an artifact written by one solc version is either read exactly or rejected loudly.
"""
from __future__ import annotations

import itertools
import json
import numbers
import operator
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch

AXES: tuple[str, ...] = ("attn", "mlp", "quant")
QUANT_MODES: tuple[str, ...] = ("weight", "activation")
DEFAULT_QUANT_MODE = "weight"
QUANT_LEVELS: dict[str, tuple] = {"weight": (4, 8, 16), "activation": (5, 7, 16)}
DEFAULT_LEVELS: dict[str, tuple] = {"attn": (0.1, 0.6, 1.0), "mlp": (0.4, 0.8, 1.0), "quant": QUANT_LEVELS["weight"]}
DENSE_LEVEL: dict[str, Any] = {"attn": 1.0, "mlp": 1.0, "quant": 16}
MIN_BITS, MAX_BITS = 2, 16
WEIGHT_BITS: tuple[int, ...] = (4, 8, 16)  # the weight copies solc can make (int4, int8) and dense
VERSION = 1


@dataclass(frozen=True)
class Action:
    """One point of the action space: attn keep, mlp keep (fractions in (0, 1]) and MLP-output bits."""

    attn: float = 1.0
    mlp: float = 1.0
    bits: int = 16

    @property
    def costs(self) -> dict[str, float]:
        """Per-axis budget cost, keyed by axis name: attn keep, mlp keep, bits / 16."""
        return {"attn": float(self.attn), "mlp": float(self.mlp), "quant": self.bits / MAX_BITS}

    @property
    def is_dense(self) -> bool:
        return self.attn == 1.0 and self.mlp == 1.0 and self.bits >= MAX_BITS

    def level(self, axis: str) -> float | int:
        """The level on `axis` ("attn", "mlp" or "quant")."""
        if axis not in AXES:
            raise ValueError(f"unknown axis {axis!r}; valid axes: {list(AXES)}")
        return {"attn": self.attn, "mlp": self.mlp, "quant": self.bits}[axis]

    def to_dict(self) -> dict[str, Any]:
        return {"attn": self.attn, "mlp": self.mlp, "bits": self.bits}


def validate_quant_mode(quant: Any) -> str:
    if quant not in QUANT_MODES:
        raise ValueError(
            f"quant={quant!r} is not a quant mode; valid choices: {list(QUANT_MODES)} (\"weight\": int8/int4 "
            f"weight copies, grid {list(QUANT_LEVELS['weight'])}; \"activation\": the paper's fake-quantized "
            f"MLP output, grid {list(QUANT_LEVELS['activation'])})"
        )
    return quant


def _validate_level(axis: str, value: Any, quant: str = DEFAULT_QUANT_MODE) -> float | int:
    if axis == "quant":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(
                f"quant level {value!r} is not an int bit-width; valid choices in quant={quant!r} mode: "
                f"{_valid_bits(quant)} (16 = dense), e.g. {list(QUANT_LEVELS[quant])}"
            )
        value = int(value)
        if quant == "weight" and value not in WEIGHT_BITS:
            raise ValueError(
                f"quant level {value!r} has no weight copy; valid choices in quant='weight' mode: "
                f"{list(WEIGHT_BITS)} (16 = dense); other bit-widths need quant='activation'"
            )
        if not MIN_BITS <= value <= MAX_BITS:
            raise ValueError(
                f"quant level {value!r} is out of range; valid choices in quant={quant!r} mode: "
                f"{_valid_bits(quant)} (16 = dense)"
            )
        return value
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(
            f"{axis} level {value!r} is not a number; valid choices: a keep fraction in (0, 1] "
            f"(1.0 = dense), e.g. {list(DEFAULT_LEVELS[axis])}"
        )
    value = float(value)
    if not 0.0 < value <= 1.0:  # also rejects NaN
        raise ValueError(
            f"{axis} level {value!r} is outside (0, 1]; valid choices: a keep fraction in (0, 1] (1.0 = dense)"
        )
    return value


def _valid_bits(quant: str) -> str:
    return str(list(WEIGHT_BITS)) if quant == "weight" else f"an int in {MIN_BITS}..{MAX_BITS}"


def _validate_levels(axis: str, values: Any, quant: str = DEFAULT_QUANT_MODE) -> tuple:
    if not isinstance(values, (list, tuple)):
        raise ValueError(
            f"levels for axis {axis!r} must be a list, got {values!r}; e.g. {list(DEFAULT_LEVELS[axis])}"
        )
    if len(values) == 0:
        raise ValueError(
            f"levels for axis {axis!r} are an empty list; give at least the dense level "
            f"{DENSE_LEVEL[axis]!r}, e.g. {list(DEFAULT_LEVELS[axis])}"
        )
    checked = [_validate_level(axis, v, quant) for v in values]
    seen: set = set()
    for v in checked:
        if v in seen:
            raise ValueError(f"duplicate level {v!r} for axis {axis!r} in {list(values)}; each level must appear once")
        seen.add(v)
    if DENSE_LEVEL[axis] not in seen:
        raise ValueError(
            f"levels {list(values)} for axis {axis!r} lack the dense level {DENSE_LEVEL[axis]!r}; "
            f"every grid must contain it, e.g. {list(DEFAULT_LEVELS[axis])}"
        )
    return tuple(sorted(checked))


def check_axes(axes, argument: str = "axes", shown=None) -> None:
    """ValueError unless `axes` is a non-empty list of distinct axis names. The message starts with
    `argument`=`shown` (default: `axes`), so a caller that takes the axes under another name (compile's
    `actions`) reports the argument and the value its user passed."""
    head = f"{argument}={axes if shown is None else shown!r} is invalid"
    if not isinstance(axes, (list, tuple)):
        raise ValueError(f"{head}: a list of axis names; valid axes: {list(AXES)} (e.g. ['mlp'])")
    if len(axes) == 0:
        raise ValueError(f"{head}: it is empty; enable at least one of {list(AXES)}")
    for a in axes:
        if a not in AXES:
            raise ValueError(f"{head}: unknown axis {a!r}; valid axes: {list(AXES)}")
    for a in axes:
        if list(axes).count(a) > 1:
            raise ValueError(f"{head}: duplicate axis {a!r}; valid axes, each at most once: {list(AXES)}")


class ActionSpace:
    """The Cartesian product of the enabled axes' levels.

    Enabled axes are stored in canonical order ("attn", "mlp", "quant") whatever order they are given
    in; each axis' levels are sorted ascending. Action i enumerates attn (outermost) > mlp > quant
    (innermost), each ascending, so the dense action is always the last one. Disabled axes are fixed
    at dense (keep 1.0 / 16 bits). `quant` is the quant mode ("weight" or "activation"); it sets the
    default bit grid and which bit-widths are valid.
    """

    def __init__(self, axes: Sequence[str] = AXES, levels: Mapping[str, Sequence] | None = None,
                 quant: str = DEFAULT_QUANT_MODE):
        self._quant = validate_quant_mode(quant)
        check_axes(axes)
        self._axes: tuple[str, ...] = tuple(a for a in AXES if a in axes)

        if levels is None:
            levels = {}
        if not isinstance(levels, Mapping):
            raise ValueError(
                f"levels must be a dict mapping an enabled axis to its level list, got {levels!r}; "
                f"enabled axes: {list(self._axes)}"
            )
        for a in levels:
            if a not in self._axes:
                valid = f"valid axes: {list(AXES)}" if a not in AXES else f"axis {a!r} is not enabled"
                raise ValueError(
                    f"levels given for axis {a!r}, which is not an enabled axis ({valid}); "
                    f"enabled axes: {list(self._axes)}"
                )
        defaults = {**DEFAULT_LEVELS, "quant": QUANT_LEVELS[self._quant]}
        self._levels: dict[str, tuple] = {
            a: _validate_levels(a, levels[a], self._quant) if a in levels else tuple(defaults[a]) for a in self._axes
        }
        grids = [self._levels.get(a, (DENSE_LEVEL[a],)) for a in AXES]
        self._actions: tuple[Action, ...] = tuple(
            Action(attn=float(at), mlp=float(ml), bits=int(b)) for at, ml, b in itertools.product(*grids)
        )
        self._index: dict[Action, int] = {act: i for i, act in enumerate(self._actions)}

    # -- structure -------------------------------------------------------------------------------
    @property
    def axes(self) -> tuple[str, ...]:
        """Enabled axes, in canonical order."""
        return self._axes

    @property
    def quant(self) -> str:
        """The quant mode: "weight" (int8/int4 MLP weight copies) or "activation" (fake-quantized output)."""
        return self._quant

    @property
    def weight_bits(self) -> tuple[int, ...]:
        """The low bit-widths (< 16) whose weight copies this space needs (empty in activation mode)."""
        if self._quant != "weight" or "quant" not in self._levels:
            return ()
        return tuple(b for b in self._levels["quant"] if b < MAX_BITS)

    @property
    def cheapest_cost(self) -> dict[str, float]:
        """Per enabled axis, the cost of its cheapest level (keep fraction, or bits / 16): the lower bound of
        any per-axis budget this space can meet."""
        return {a: (min(v) / MAX_BITS if a == "quant" else float(min(v))) for a, v in self._levels.items()}

    @property
    def levels(self) -> dict[str, tuple]:
        """Enabled axis -> its levels, ascending (keep fractions as float, bits as int)."""
        return dict(self._levels)

    @property
    def actions(self) -> tuple[Action, ...]:
        return self._actions

    def __len__(self) -> int:
        return len(self._actions)

    def __iter__(self) -> Iterator[Action]:
        return iter(self._actions)

    def __getitem__(self, i) -> Action:
        i = operator.index(i)
        if not -len(self) <= i < len(self):
            raise IndexError(f"action index {i} out of range for an action space of {len(self)} actions")
        return self._actions[i]

    def index(self, action: Action) -> int:
        try:
            return self._index[action]
        except (KeyError, TypeError):
            raise ValueError(f"{action!r} is not in this action space; valid actions: {list(self._actions)}") from None

    def __contains__(self, action) -> bool:
        return isinstance(action, Action) and action in self._index

    @property
    def dense_index(self) -> int:
        """Index of the dense action (always the last one)."""
        return self._index[Action()]

    # -- tables ----------------------------------------------------------------------------------
    def level_table(self) -> torch.Tensor:
        """float64 [A, 3]: attn keep, mlp keep, bits (as the solc:: ops read them)."""
        return torch.tensor([[a.attn, a.mlp, float(a.bits)] for a in self._actions], dtype=torch.float64)

    def cost_table(self) -> torch.Tensor:
        """float64 [A, 3]: attn keep, mlp keep, bits / 16 (the per-axis budget cost of each action)."""
        return torch.tensor([[a.attn, a.mlp, a.bits / MAX_BITS] for a in self._actions], dtype=torch.float64)

    def net_keep(self, i) -> float:
        """Net keep of action i: the mean of its costs over the ENABLED axes only.

        Disabled axes (always dense) do not dilute it: in ActionSpace(["mlp"]) the net keep of an
        action is its mlp keep. With all three axes this is the paper's x-axis.
        """
        costs = self[i].costs
        return sum(costs[a] for a in self._axes) / len(self._axes)

    # -- serialisation ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {
            "version": VERSION,
            "axes": list(self._axes),
            "levels": {a: list(v) for a, v in self._levels.items()},
            "quant": self._quant,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "ActionSpace":
        if not isinstance(d, Mapping):
            raise ValueError(f"an ActionSpace dict must be a dict, got {d!r}")
        version = d.get("version")
        if version != VERSION:
            raise ValueError(f"unsupported ActionSpace version {version!r}; supported versions: [{VERSION}]")
        fields = ["version", "axes", "levels", "quant"]
        unknown = set(d) - set(fields)
        if unknown:
            raise ValueError(f"unknown ActionSpace fields {sorted(unknown)}; valid fields: {fields}")
        if "axes" not in d:
            raise ValueError(f"ActionSpace dict lacks 'axes'; valid fields: {fields}")
        # Dicts written before the quant mode existed describe the paper's activation semantics.
        return cls(d["axes"], d.get("levels"), quant=d.get("quant", "activation"))

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "ActionSpace":
        return cls.from_dict(json.loads(s))

    # -- identity --------------------------------------------------------------------------------
    def __eq__(self, other) -> bool:
        if not isinstance(other, ActionSpace):
            return NotImplemented
        return self._axes == other._axes and self._levels == other._levels and self._quant == other._quant

    def __hash__(self) -> int:
        return hash((self._axes, tuple(sorted(self._levels.items())), self._quant))

    def __repr__(self) -> str:
        lv = ", ".join(f"{a}={list(v)}" for a, v in self._levels.items())
        return f"ActionSpace({lv}; quant={self._quant!r}; {len(self)} actions)"
