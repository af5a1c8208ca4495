"""What a budget means: per-axis keep fractions (the paper's) or one cost fraction (solc's default).

    spec = BudgetSpec.cost(BytesCostModel.for_model(sol), context=256)    # or BudgetSpec.per_axis()
    spec.table(space)          # float64 [A, 3]: the cost of each action in each budget column
    spec.enabled               # (bool, bool, bool): the columns a target and a penalty apply to
    spec.targets(0.6, batch)   # [B, 3] targets; a cost budget outside the feasible range is an error
    spec.realized(space, actions, controlled, kv_lens)   # [B, 3] realized budget of what ran

Both modes share one shape, [3] columns per step, so the policy (its 3 targets and 3 running
deviations), the sources and the GRPO penalty work unchanged:

  per-axis  columns attn keep, mlp keep, bits/16; enabled = the space's axes (DESIGN "Budget").
  cost      column 0 = the action's cost relative to the dense step (from a cost model, runtime/
            cost_model.py); columns 1 and 2 are constant 1.0 and disabled. The policy's table prices
            actions at `context` keys; the REALIZED cost prices every step at the keys it really
            attended (sum_t cost(a_t, kv_t) / sum_t cost(dense, kv_t)), so what is reported is what ran.

A spec is a small versioned dict (`to_dict` / `from_dict`) that travels in policy.pt and the export
manifest, with the cost model it prices with.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from runtime.actions import AXES, ActionSpace
from runtime.cost_model import CostBudgetError, cost_model_from_dict, realized_cost, relative_costs
from runtime.costs import realized_budget
from runtime.errors import ArgumentError, ArgumentTypeError

VERSION = 1
BUDGET_MODES = ("cost", "per-axis")
DEFAULT_COST_CONTEXT = 256  # kv_len the policy's relative cost table is priced at (the training context)


@dataclass(frozen=True)
class BudgetSpec:
    mode: str = "per-axis"
    cost_model: dict | None = field(default=None, hash=False, compare=True)  # a cost model's to_dict() (cost mode)
    context: int = DEFAULT_COST_CONTEXT
    version: int = VERSION

    def __post_init__(self):
        if self.mode not in BUDGET_MODES:
            raise ValueError(f"budget_mode={self.mode!r} is invalid: one of {list(BUDGET_MODES)}")
        if self.mode == "cost":
            if self.cost_model is None:
                raise ValueError("a cost budget needs a cost model (runtime.cost_model: bytes or measured)")
            cost_model_from_dict(self.cost_model)  # validates kind and version
        if isinstance(self.context, bool) or not isinstance(self.context, int) or self.context < 1:
            raise ValueError(f"context must be an int >= 1, got {self.context!r}")
        if self.version != VERSION:
            raise ValueError(f"budget spec version {self.version!r} is not supported (expected {VERSION})")

    # -- constructors ------------------------------------------------------------------------------
    @classmethod
    def per_axis(cls) -> "BudgetSpec":
        return cls("per-axis")

    @classmethod
    def cost(cls, cost_model, context: int = DEFAULT_COST_CONTEXT) -> "BudgetSpec":
        d = cost_model if isinstance(cost_model, dict) else cost_model.to_dict()
        return cls("cost", d, int(context))

    # -- what the columns mean ---------------------------------------------------------------------
    @property
    def is_cost(self) -> bool:
        return self.mode == "cost"

    def model(self):
        return cost_model_from_dict(self.cost_model) if self.is_cost else None

    def enabled(self, space: ActionSpace) -> tuple[bool, bool, bool]:
        if self.is_cost:
            return (True, False, False)
        return tuple(axis in space.axes for axis in AXES)

    def columns(self, space: ActionSpace) -> list[int]:
        return [i for i, on in enumerate(self.enabled(space)) if on]

    def column_names(self, space: ActionSpace) -> list[str]:
        return ["cost"] if self.is_cost else [AXES[i] for i in self.columns(space)]

    def table(self, space: ActionSpace, context: int | None = None) -> Tensor:
        """float64 [A, 3]: each action's cost per column (per-axis: keep, keep, bits/16)."""
        if not self.is_cost:
            return space.cost_table()
        out = torch.ones(len(space), 3, dtype=torch.float64)
        out[:, 0] = relative_costs(self.model(), list(space), [context or self.context])[0]
        return out

    def feasible_range(self, space: ActionSpace, context: int | None = None) -> tuple[float, float]:
        """The lowest and highest target a schedule can realize on the first enabled column."""
        col = self.table(space, context)[:, self.columns(space)[0]]
        return float(col.min()), float(col.max()) if not self.is_cost else 1.0

    # -- requests and realized budgets ---------------------------------------------------------------
    def targets(self, budget, batch: int, space: ActionSpace, argument: str = "budget") -> Tensor:
        """[B, 3] float64 targets. Cost mode: one number (or [B]) in the feasible range, else an error
        naming the range; per-axis: a number for every axis, a per-axis dict, [3] or [B, 3] in (0, 1]."""
        if not self.is_cost:
            from runtime.stepper import budget_targets

            return budget_targets(budget, batch)
        if isinstance(budget, dict):
            raise CostBudgetError(argument, f"{argument}={budget!r}: a cost budget is one number (the fraction of the "
                                  "dense decode cost); per-axis targets need budget_mode='per-axis' (and, with a "
                                  "trained policy, one trained for a per-axis budget)")
        if isinstance(budget, (bool, str, bytes)) or budget is None:
            raise CostBudgetError(argument, f"{argument}={budget!r}: a cost budget is a number (or [{batch}] numbers) "
                                  "in the feasible cost range")
        try:
            t = torch.as_tensor(budget, dtype=torch.float64).reshape(-1)
        except (TypeError, ValueError, RuntimeError, OverflowError):
            raise CostBudgetError(argument, f"{argument}={budget!r}: a cost budget is a number (or [{batch}] numbers) "
                                  "in the feasible cost range") from None
        if t.numel() == 1:
            t = t.expand(batch)
        if t.shape != (batch,):
            raise CostBudgetError(argument, f"{argument} must be one number or [{batch}] numbers, got shape "
                                  f"{tuple(t.shape)}")
        lo, hi = self.feasible_range(space)
        if bool(((t < lo - 1e-9) | (t > hi + 1e-9) | t.isnan()).any()):
            raise CostBudgetError(
                argument,
                f"{argument}={budget!r} is outside the feasible cost range [{lo:.3f}, {hi:.1f}] "
                f"(the cheapest action costs {lo:.3f} of a dense step at {self.context} keys under the "
                f"{self.cost_model['kind']} cost model)")
        out = torch.ones(batch, 3, dtype=torch.float64)
        out[:, 0] = t
        return out

    def realized(self, space: ActionSpace, actions: Tensor, controlled: Tensor, kv_lens: Tensor,
                 empty: float = 1.0) -> Tensor:
        """[B, 3] float64 realized budget of what ran: actions [B, N] (-1 = nothing ran), controlled
        [B, N], kv_lens [B, N] keys each step attended (incl. its own)."""
        if not self.is_cost:
            return realized_budget(space, actions, controlled, empty)
        counted = controlled & (actions >= 0)
        cost = realized_cost(self.model(), list(space), actions.clamp(min=0), kv_lens, counted)
        out = torch.ones(actions.shape[0], 3, dtype=torch.float64)
        out[:, 0] = torch.where(cost.isnan(), torch.full_like(cost, empty), cost)
        return out

    # -- persistence -------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"mode": self.mode, "cost_model": self.cost_model, "context": self.context, "version": self.version}

    @classmethod
    def from_dict(cls, d: dict | None) -> "BudgetSpec":
        if d is None:
            return cls.per_axis()
        if not isinstance(d, dict) or d.get("version") != VERSION:
            raise ValueError(f"budget spec version {d.get('version') if isinstance(d, dict) else d!r} is not "
                             f"supported (expected {VERSION})")
        return cls(d["mode"], d.get("cost_model"), int(d.get("context", DEFAULT_COST_CONTEXT)))


def default_cost_spec(sol, context: int = DEFAULT_COST_CONTEXT) -> BudgetSpec:
    """The model's cost budget: its measured cost model when one is calibrated, else the bytes model."""
    from runtime.cost_model import BytesCostModel

    measured = getattr(sol, "cost_model", None)
    return BudgetSpec.cost(measured if measured is not None else BytesCostModel.for_model(sol), context)


def resolve_spec(sol, budget_mode: str | None, source=None) -> BudgetSpec:
    """The spec a call prices with: the source's own (a trained policy's), else by budget_mode."""
    own = getattr(source, "budget_spec", None)
    if own is not None:
        if budget_mode is not None and budget_mode != own.mode:
            raise ArgumentError("budget_mode", f"budget_mode={budget_mode!r}, but the policy was trained for a "
                                               f"{own.mode!r} budget")
        return own
    if budget_mode is None or budget_mode == "cost":
        return default_cost_spec(sol)
    if budget_mode == "per-axis":
        return BudgetSpec.per_axis()
    raise ValueError(f"budget_mode={budget_mode!r} is invalid: one of {list(BUDGET_MODES)}")


def _numbers(budget) -> Tensor | None:
    """A list, tuple or tensor budget as float64 numbers, or None (not a sequence of numbers)."""
    if isinstance(budget, (list, tuple, Tensor)) and not isinstance(budget, (str, bytes)):
        try:
            return torch.as_tensor(budget, dtype=torch.float64)
        except (TypeError, ValueError, RuntimeError):
            return None
    return None


def is_per_axis_request(budget) -> bool:
    """A dict over axes, or three numbers per row ([3] / [B, 3]): the paper's per-axis budget."""
    if isinstance(budget, dict):
        return True
    t = _numbers(budget)
    return t is not None and (t.dim() == 2 or tuple(t.shape) == (3,))


def _three_numbers(budget) -> bool:
    """A flat sequence of three numbers: per-axis keeps, or one cost per row of a batch of 3."""
    t = _numbers(budget)
    return t is not None and tuple(t.shape) == (3,)


def is_cost_request(policy, budget, budget_mode: str | None) -> bool:
    """Whether `budget` of a generate/score call is a cost fraction (checked against the cost model's
    feasible range) rather than per-axis keeps (checked against (0, 1])."""
    own = getattr(policy, "budget_spec", None)
    if budget is None or budget_mode == "per-axis" or (own is not None and not own.is_cost):
        return False
    if budget_mode == "cost" or own is not None:
        return True
    # a baseline source (Fixed, Random, ...) reads per-axis targets unless told otherwise
    return policy is None and not is_per_axis_request(budget)


def resolve_budget(sol, policy, schedule, budget, budget_mode: str | None, steps: int, batch: int,
                   force: bool = False):
    """(source, spec) of one generate/score call. Who picks the actions: `policy`, else `schedule`, else
    a static schedule at `budget` (cost mode: the lower-hull mix of the two actions around the cost,
    `cost_fixed`; per-axis: the paper's Fixed), else dense. What the budget means: the policy's own
    spec, else `budget_mode`, else per-axis for a per-axis request (a dict or three numbers) and a cost
    fraction for one number. A measured cost model is only used on the device and batch it was
    calibrated for, unless force=True. Without a policy the cost table is priced at the default context
    (DEFAULT_COST_CONTEXT keys, like the policy's), never at the call's own lengths: a row's schedule must
    not depend on its batch mates (the realized cost still prices each step at the keys it attended)."""
    from runtime.schedulers import cost_fixed
    from runtime.stepper import resolve_source

    if budget_mode is not None and budget_mode not in BUDGET_MODES:
        raise ArgumentError("budget_mode", f"budget_mode={budget_mode!r} is invalid: one of {list(BUDGET_MODES)}")
    if not isinstance(force, bool):
        raise ArgumentTypeError("force", f"force={force!r} is invalid: True or False")
    if budget_mode is None and policy is None and _three_numbers(budget) and batch == 3:
        raise ArgumentError("budget", f"budget={budget!r} is ambiguous at batch 3: three numbers are per-axis keeps "
                                      "(attn, mlp, bits/16) and also one cost fraction per row; pass "
                                      "budget_mode='per-axis' or budget_mode='cost'")
    if getattr(policy, "budget_spec", None) is not None:
        spec = resolve_spec(sol, budget_mode, policy)
    elif budget_mode == "cost" or (budget_mode is None and policy is None and not is_per_axis_request(budget)):
        spec = default_cost_spec(sol)
    else:  # a per-axis request, or a baseline source (Fixed, Random, ...): they read per-axis targets
        spec = BudgetSpec.per_axis()
    if spec.is_cost:
        model = spec.model()
        if hasattr(model, "check"):
            from runtime.cost_model import BytesCostModel, CostModelError, device_name

            try:
                model.check(device_name(sol.token_embedding.device), batch, force)
            except CostModelError:
                if budget is not None or getattr(policy, "budget_spec", None) is not None:
                    raise
                # Nothing is priced to choose the actions (dense, or a given schedule): report what ran
                # in the device-independent bytes model rather than refuse, or misprice, the call.
                spec = BudgetSpec.cost(BytesCostModel.for_model(sol), spec.context)
        if budget is not None:
            spec.targets(budget, batch, sol.space)  # the feasible-range error, before any work
        if policy is None and schedule is None and budget is not None:
            return cost_fixed(sol.space, spec.table(sol.space)[:, 0]), spec
    return resolve_source(sol.space, policy, schedule, budget, steps), spec
