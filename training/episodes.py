"""Teacher-forced episodes: one dense prefill per context, K counterfactual schedules, T controlled steps.

    targets = sample_targets(sol.space, n_contexts, generator)            # [C, 3]
    ep = rollout(sol, contexts, PolicySource(policy, record=True), targets, group=16, horizon=16, generator=g)
    ep.logp        # [C*K, T] log p(y_t) of every controlled step
    ep.actions     # [C*K, T] the actions that ran
    ep.budget      # [C*K, 3] realized per-axis budget, from ep.actions (DESIGN invariant 4)

Step protocol (runtime/stepper.py, the one shared by generate and score, so training scores exactly
what deployment runs): a context x_0..x_{L-1} is split at P = L - T - 1. x_0..x_{P-1} are prefilled densely ONCE per
context; the prefilled KV cache is then repeated K times (row-major: context 0's K schedules first)
and the K schedules of a context run batched together. Controlled step t (0..T-1) feeds x_{P+t} at
position P+t with the action the source picked (from the previous token's hidden state and x_{P+t}'s
embedding) and is rewarded with log p(x_{P+t+1}). Positions below DENSE_PREFIX run dense and count in
no budget. Rows of an episode batch are ordered context-major: row c*K + k is schedule k of context c.

Used by GRPO training and by evaluation: any ActionSource works (a policy, Fixed, Random, Schedule).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from runtime.actions import AXES, ActionSpace
from runtime.costs import realized_budget  # noqa: F401  (re-exported: the one budget function)
from runtime.schedulers import ActionSource
from runtime.stepper import Stepper, collector_paused

# DESIGN.md: per-context budget targets, per axis (cost units: keep fractions, bits/16). The paper's
# ranges start at its grid's cheapest level on each axis; every axis follows the space's grid (the default
# grid: attn 0.1, mlp 0.4, 4 bits in weight mode: 0.25), see `default_target_ranges`.
TARGET_RANGES: dict[str, tuple[float, float]] = {"attn": (0.1, 1.0), "mlp": (0.4, 1.0), "quant": (0.3125, 1.0)}


def default_target_ranges(space: ActionSpace) -> dict[str, tuple[float, float]]:
    """Per axis, its cheapest level's cost to 1: what the space's grid can meet (TARGET_RANGES, the paper's,
    on a disabled axis)."""
    ranges = dict(TARGET_RANGES)
    for axis in space.axes:
        ranges[axis] = (space.cheapest_cost[axis], 1.0)
    return ranges


@dataclass
class Episodes:
    """A batch of teacher-forced episodes, rows context-major (row c*group + k)."""

    logp: Tensor  # [N, T] log p(y_t) under the schedule that ran (float32, or float64 on an fp64 model)
    actions: Tensor  # [N, T] long: the actions that ran
    controlled: Tensor  # [N, T] bool: counted in the budget (not forced dense)
    budget: Tensor  # [N, 3] float64 realized mean cost per axis over controlled steps (1.0 if none)
    targets: Tensor  # [N, 3] float64 the targets the source was given
    tokens: Tensor  # [N, T] the scored tokens y_t
    group: int  # K: schedules per context
    prefill_len: int  # P

    @property
    def horizon(self) -> int:
        return self.logp.shape[1]

    def net_keep(self, space: ActionSpace) -> Tensor:
        """[N] realized net keep: mean of the realized budget over the enabled axes."""
        cols = [AXES.index(a) for a in space.axes]
        return self.budget[:, cols].mean(dim=1)

    def mean_logp(self) -> Tensor:
        """[N] mean log-likelihood over the controlled steps of each episode."""
        c = self.controlled.to(self.logp.dtype)
        return (self.logp * c).sum(1) / c.sum(1).clamp(min=1)


def sample_targets(
    space: ActionSpace,
    n: int,
    generator: torch.Generator | None = None,
    ranges: dict[str, Sequence[float]] | None = None,
) -> Tensor:
    """[n, 3] float64 per-context targets: U[lo, hi] on each enabled axis (`default_target_ranges`),
    1.0 on disabled axes. Three uniforms are drawn per row whatever the axes, so enabling an axis does
    not shift the other axes' draws."""
    ranges = {**default_target_ranges(space), **(ranges or {})}
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    out = torch.ones(n, 3, dtype=torch.float64)
    for i, axis in enumerate(AXES):
        if axis in space.axes:
            lo, hi = ranges[axis]
            out[:, i] = lo + (hi - lo) * u[:, i]
    return out


def sample_cost_targets(spec, space: ActionSpace, n: int, generator: torch.Generator | None = None,
                        cost_range: Sequence[float] | None = None) -> Tensor:
    """[n, 3] float64 cost-budget targets: column 0 ~ U[lo, hi] (default: the cheapest action's cost
    at the spec's context to 1), columns 1 and 2 are 1.0. Three uniforms are drawn per row, as in
    `sample_targets`."""
    lo, hi = cost_range if cost_range else spec.feasible_range(space)
    u = torch.rand(n, 3, generator=generator, dtype=torch.float64)
    out = torch.ones(n, 3, dtype=torch.float64)
    out[:, 0] = lo + (hi - lo) * u[:, 0]
    return out


@torch.no_grad()
def rollout(
    sol,
    contexts: Tensor,
    source: ActionSource,
    targets: Tensor,
    group: int = 16,
    horizon: int = 16,
    generator=None,
    on_step: Callable[[int], None] | None = None,
    dispatcher=None,
    budget_spec=None,
) -> Episodes:
    """Run `group` schedules from `source` on each of the C `contexts` [C, L] (teacher-forced).

    targets: [C, 3] per context (repeated over its schedules), [C*group, 3] per row, or [3] / [1, 3].
    A driver over runtime.stepper.Stepper: the prefill runs once for all contexts; each controlled
    step is one step over all C*group rows. `generator` is handed to `source.reset`. `budget_spec`
    (runtime.budget.BudgetSpec) prices `Episodes.budget`: by default the source's own (a policy's),
    else per axis; in cost mode column 0 is the realized cost fraction.
    """
    if contexts.dim() != 2:
        raise ValueError(f"contexts must be [C, L], got shape {tuple(contexts.shape)}")
    C, L = contexts.shape
    P = L - horizon - 1
    if P < 1:
        raise ValueError(f"context length {L} leaves no prefill for horizon {horizon}: need L >= horizon + 2")
    if group < 1:
        raise ValueError(f"group must be >= 1, got {group}")
    device = sol.token_embedding.device
    contexts = contexts.to(device)
    N = C * group
    targets = torch.as_tensor(targets, dtype=torch.float64)
    if targets.dim() == 1 or targets.shape[0] == 1:
        targets = targets.reshape(1, 3).expand(N, 3)
    elif targets.shape[0] == C and group > 1:
        targets = targets.repeat_interleave(group, dim=0)
    if targets.shape != (N, 3):
        raise ValueError(f"targets must be [3], [{C}, 3] or [{N}, 3], got {tuple(targets.shape)}")

    stepper = Stepper(sol, source, dispatcher, budget_spec)
    stepper.prefill(contexts[:, :P], horizon, repeats=group, targets=targets, generator=generator)
    ids = contexts.repeat_interleave(group, dim=0) if group > 1 else contexts
    logps = []
    with collector_paused():
        for t in range(horizon):
            out = stepper.step(ids[:, P + t])
            logps.append(out.logprob(ids[:, P + t + 1]))
            if on_step is not None:
                on_step(t)
    actions, controlled = stepper.actions, stepper.controlled
    return Episodes(
        logp=torch.stack(logps, 1),
        actions=actions,
        controlled=controlled,
        budget=stepper.budget().cpu(),
        targets=targets,
        tokens=ids[:, P + 1 : P + 1 + horizon],
        group=group,
        prefill_len=P,
    )
