"""Action sources: whatever picks one action per row at each controlled decode step.

Every source implements the same two calls, so `generate`, training episodes and evaluation treat a
trained policy, the baselines and a fixed schedule alike:

    source.reset(space, batch, targets, horizon, generator)   # targets [B, 3]: attn, mlp, bits/16
    actions = source.next_actions(step, hidden, token_embedding, dense)   # LongTensor [B]

`hidden` [B, d] is the base model's last-layer hidden state of the previous token, `token_embedding`
[B, d] the embedding of the token being fed, `dense` [B] bool marks steps that must run dense (the
first DENSE_PREFIX positions of a sequence); a source returns the dense action there, on `dense`'s
device. A source keeps its per-step state on that device and never reads it back to the host: the
stepper's one host read per step is the actions it returns (docs/runtime.md, "Host syncs").
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from runtime.actions import AXES, ActionSpace

DENSE_PREFIX = 7  # DESIGN: the first Ts + Tw + 1 positions run dense and count in no budget


class ActionSource:
    def reset(self, space: ActionSpace, batch: int, targets: Tensor, horizon: int, generator=None) -> None:
        self.space, self.batch, self.horizon, self.generator = space, batch, horizon, generator
        self.targets = targets

    def next_actions(self, step: int, hidden: Tensor, token_embedding: Tensor, dense: Tensor) -> Tensor:
        raise NotImplementedError

    def _with_dense(self, actions: Tensor, dense: Tensor) -> Tensor:
        return torch.where(dense.to(actions.device), torch.full_like(actions, self.space.dense_index), actions)


class Schedule(ActionSource):
    """A fixed action schedule: `actions` [B, horizon] (or [horizon], shared by all rows)."""

    def __init__(self, actions: Tensor):
        self.actions = torch.as_tensor(actions, dtype=torch.long)

    def reset(self, space, batch, targets, horizon, generator=None):
        super().reset(space, batch, targets, horizon, generator)
        sched = self.actions if self.actions.dim() == 2 else self.actions.expand(batch, -1)
        if sched.shape[0] != batch or sched.shape[1] < horizon:
            raise ValueError(f"schedule has shape {tuple(self.actions.shape)}; expected [{batch}, >= {horizon}] or [>= {horizon}]")
        if int(sched.min()) < 0 or int(sched.max()) >= len(space):
            raise ValueError(f"schedule holds action indices outside 0..{len(space) - 1}")
        self._sched = sched

    def next_actions(self, step, hidden, token_embedding, dense):
        return self._with_dense(self._sched[:, step].to(dense.device), dense)


def axis_level_counts(levels: tuple, target: float, steps: int, cost=lambda l: float(l)) -> dict:
    """How many of `steps` steps run at each of the two grid levels around `target` (a cost), so that
    the mean cost is as close to the target as whole steps allow. Targets outside the grid clamp."""
    costs = [cost(l) for l in levels]
    if target <= costs[0]:
        return {levels[0]: steps}
    if target >= costs[-1]:
        return {levels[-1]: steps}
    hi = next(i for i, c in enumerate(costs) if c >= target)
    lo = hi - 1
    frac_hi = (target - costs[lo]) / (costs[hi] - costs[lo])
    n_hi = int(math.floor(frac_hi * steps + 0.5))
    return {levels[lo]: steps - n_hi, levels[hi]: n_hi}


def _round_robin(counts: dict, steps: int) -> list:
    """Interleave levels evenly (error diffusion), e.g. {a: 2, b: 4} -> b a b b a b."""
    out, acc = [], {lvl: 0.0 for lvl in counts}
    for _ in range(steps):
        for lvl, n in counts.items():
            acc[lvl] += n / steps
        pick = max(acc, key=acc.get)
        acc[pick] -= 1.0
        out.append(pick)
    return out


def _axis_cost(axis: str):
    return (lambda b: b / 16.0) if axis == "quant" else (lambda k: float(k))


class Fixed(ActionSource):
    """Fixed baseline: per axis, round-robin between the two grid levels nearest the target so the
    realized budget over the horizon matches it (to within one step)."""

    def level_sequences(self, row: int) -> dict[str, list]:
        seqs = {}
        for axis in self.space.axes:
            column = AXES.index(axis)
            target = float(self.targets[row, column])
            counts = axis_level_counts(self.space.levels[axis], target, self.horizon, _axis_cost(axis))
            seqs[axis] = _round_robin(counts, self.horizon)
        return seqs

    def reset(self, space, batch, targets, horizon, generator=None):
        super().reset(space, batch, torch.as_tensor(targets, dtype=torch.float64).expand(batch, 3), horizon, generator)
        self._sched = torch.tensor([self._actions(self.level_sequences(r)) for r in range(batch)], dtype=torch.long)
        self._cursor = torch.zeros(batch, dtype=torch.long)
        self._rows = torch.arange(batch)

    def _actions(self, seqs: dict[str, list]) -> list[int]:
        dense = self.space[self.space.dense_index]
        out = []
        for t in range(self.horizon):
            level = {axis: seqs[axis][t] if axis in seqs else getattr(dense, "bits" if axis == "quant" else axis) for axis in AXES}
            out.append(self.space.index(type(dense)(attn=level["attn"], mlp=level["mlp"], bits=level["quant"])))
        return out

    def next_actions(self, step, hidden, token_embedding, dense):
        # Dense steps do not consume the schedule: the budget counts controlled steps only.
        if self._sched.device != dense.device:  # the schedule and cursor move to the device once
            self._sched, self._cursor, self._rows = (t.to(dense.device) for t in (self._sched, self._cursor, self._rows))
        picked = self._sched[self._rows, self._cursor.clamp(max=self.horizon - 1)]
        self._cursor = self._cursor + (~dense).long()
        return self._with_dense(picked, dense)


class Random(Fixed):
    """Random baseline: the Fixed schedule's levels, shuffled independently per axis and row, so the
    realized budget equals Fixed's exactly while the placement is random."""

    def level_sequences(self, row: int) -> dict[str, list]:
        seqs = super().level_sequences(row)
        for axis, seq in seqs.items():
            perm = torch.randperm(len(seq), generator=self.generator).tolist()
            seqs[axis] = [seq[i] for i in perm]
        return seqs
