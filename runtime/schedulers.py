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
from typing import Sequence

import torch
from torch import Tensor

from runtime.actions import AXES, ActionSpace
from runtime.errors import ArgumentError
from runtime.validation import as_python, fail

DENSE_PREFIX = 7  # DESIGN: the first Ts + Tw + 1 positions run dense and count in no budget


def seeded(seed, batch: int):
    """generate/score's `seed` as the generator(s) of their random draws: an int gives one generator for
    the batch (its rows draw in turn from one stream, as HF's generate does); a list of `batch` ints
    gives one generator per row, so a row's draws (sampled tokens, a sampled policy's actions, Random's
    shuffles) do not depend on its batch mates: the row alone with its own seed draws the same."""
    seed = as_python(seed)  # a tensor or numpy array of seeds; a 0-d one is one int
    if isinstance(seed, (list, tuple)):
        if len(seed) != batch:
            raise ValueError(f"seed has {len(seed)} entries for {batch} rows")
        return [torch.Generator().manual_seed(int(s)) for s in seed]
    return torch.Generator().manual_seed(int(seed))


def uniforms(generator, batch: int) -> Tensor:
    """[batch] float64 uniforms in [0, 1): from one generator (None: torch's default), or from a sequence
    of G generators, each drawing for batch / G consecutive rows."""
    if generator is None or isinstance(generator, torch.Generator):
        return torch.rand(batch, generator=generator, dtype=torch.float64)
    gens, per = _shares(generator, batch)
    return torch.cat([torch.rand(per, generator=g, dtype=torch.float64) for g in gens])


def _shares(generators, batch: int) -> tuple[list, int]:
    """(the generators, how many consecutive rows each draws for)."""
    gens = list(generators)
    if batch % len(gens):
        raise ValueError(f"{len(gens)} generators cannot split a batch of {batch} rows evenly")
    return gens, batch // len(gens)


class ActionSource:
    def reset(self, space: ActionSpace, batch: int, targets: Tensor, horizon: int, generator=None) -> None:
        self.space, self.batch, self.horizon, self.generator = space, batch, horizon, generator
        self.targets = targets

    def row_generator(self, row: int):
        """The generator that draws for `row`: the one generator, or its share of a sequence of them."""
        if self.generator is None or isinstance(self.generator, torch.Generator):
            return self.generator
        gens, per = _shares(self.generator, self.batch)
        return gens[row // per]

    def next_actions(self, step: int, hidden: Tensor, token_embedding: Tensor, dense: Tensor) -> Tensor:
        raise NotImplementedError

    def _with_dense(self, actions: Tensor, dense: Tensor) -> Tensor:
        return torch.where(dense.to(actions.device), torch.full_like(actions, self.space.dense_index), actions)


class Schedule(ActionSource):
    """A fixed action schedule: `actions` [B, horizon] (or [horizon], shared by all rows)."""

    def __init__(self, actions: Tensor):
        valid = "integer action indices, shaped [B, horizon] or [horizon] (one row for all), not empty"
        try:
            t = torch.as_tensor(actions)
        except (TypeError, ValueError, RuntimeError):
            fail("actions", actions, valid, type_error=True)
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            fail("actions", actions, valid, type_error=True)  # 1.7 would run action 1
        if t.dim() not in (1, 2) or t.numel() == 0:
            fail("actions", t, valid)
        self.actions = t.to(torch.long)

    def reset(self, space, batch, targets, horizon, generator=None):
        super().reset(space, batch, targets, horizon, generator)
        sched = self.actions if self.actions.dim() == 2 else self.actions.expand(batch, -1)
        if sched.shape[0] != batch or sched.shape[1] < horizon:
            raise ArgumentError("actions", f"schedule has shape {tuple(self.actions.shape)}; expected [{batch}, >= {horizon}] or [>= {horizon}]")
        lo, hi = int(sched.min()), int(sched.max())
        if lo < 0 or hi >= len(space):
            bad = lo if lo < 0 else hi
            raise ArgumentError("actions", f"schedule holds action index {bad}, outside 0..{len(space) - 1}")
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
            perm = torch.randperm(len(seq), generator=self.row_generator(row)).tolist()
            seqs[axis] = [seq[i] for i in perm]
        return seqs


# -- cost budgets: the best static mix of whole actions ------------------------------------------
def lower_hull(costs: Tensor, losses: Tensor) -> list[int]:
    """Indices of the lower convex hull of the points (costs[i], losses[i]), cost ascending, from the
    cheapest point to the costliest. Any cost between two hull vertices is met, at the lowest loss a mix
    of whole actions can reach, by mixing those two (the best static schedule at that cost)."""
    c, l = torch.as_tensor(costs, dtype=torch.float64), torch.as_tensor(losses, dtype=torch.float64)
    if c.shape != l.shape or c.dim() != 1 or c.numel() == 0:
        raise ValueError(f"costs and losses must be two [N] tensors, got {tuple(c.shape)} and {tuple(l.shape)}")
    order = sorted(range(len(c)), key=lambda i: (float(c[i]), float(l[i])))
    hull: list[int] = []
    for i in order:
        if hull and float(c[hull[-1]]) == float(c[i]):
            continue  # same cost, higher loss: never on the lower hull
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b lies on or above the segment a -> i: drop it
            cross = (c[b] - c[a]) * (l[i] - l[a]) - (l[b] - l[a]) * (c[i] - c[a])
            if float(cross) <= 0:
                hull.pop()
            else:
                break
        hull.append(i)
    return hull


def hull_mix(hull: Sequence[int], costs: Tensor, target: float) -> tuple[int, int, float]:
    """(cheaper action, costlier action, fraction of steps on the costlier) mixing the two hull vertices
    around `target`; targets outside the hull clamp to its ends."""
    hc = [float(costs[i]) for i in hull]
    if target <= hc[0]:
        return hull[0], hull[0], 0.0
    if target >= hc[-1]:
        return hull[-1], hull[-1], 0.0
    j = next(k for k, v in enumerate(hc) if v >= target)
    return hull[j - 1], hull[j], (target - hc[j - 1]) / (hc[j] - hc[j - 1])


class HullMix(ActionSource):
    """Best static schedule at a cost budget: per row, the two lower-hull actions around its target
    (column 0 of targets, a cost fraction), interleaved evenly so that round(w * n) of any n controlled
    steps run the costlier one. Like Fixed, forced-dense steps do not consume the schedule."""

    def __init__(self, hull: Sequence[int], costs: Tensor):
        self.hull, self.costs = list(hull), torch.as_tensor(costs, dtype=torch.float64)
        if not self.hull:
            raise ValueError("HullMix needs a non-empty hull")

    def reset(self, space, batch, targets, horizon, generator=None):
        targets = torch.as_tensor(targets, dtype=torch.float64).expand(batch, 3)
        super().reset(space, batch, targets, horizon, generator)
        mixes = [hull_mix(self.hull, self.costs, float(t)) for t in targets[:, 0]]
        self._lo = torch.tensor([m[0] for m in mixes], dtype=torch.long)
        self._hi = torch.tensor([m[1] for m in mixes], dtype=torch.long)
        self._w = torch.tensor([m[2] for m in mixes], dtype=torch.float64)
        self._cursor = torch.zeros(batch, dtype=torch.float64)

    def next_actions(self, step, hidden, token_embedding, dense):
        dense = dense.bool()
        if self._lo.device != dense.device:
            self._lo, self._hi, self._w, self._cursor = (t.to(dense.device) for t in (self._lo, self._hi, self._w, self._cursor))
        k = self._cursor
        costlier = torch.floor((k + 1) * self._w + 0.5) > torch.floor(k * self._w + 0.5)
        self._cursor = k + (~dense).double()
        return self._with_dense(torch.where(costlier, self._hi, self._lo), dense)


def cost_fixed(space: ActionSpace, costs: Tensor) -> HullMix:
    """What `generate(budget=0.6)` runs without a policy in cost mode: per row, a mix of the two actions
    on the lower hull of (cost, -net keep) around its cost target. With no quality data at hand, net keep
    (the paper's proxy) ranks actions of equal cost; training/cost_eval.py fits the hull on validation
    NLL instead."""
    keep = torch.tensor([space.net_keep(i) for i in range(len(space))], dtype=torch.float64)
    return HullMix(lower_hull(costs, -keep), costs)

