"""Baselines as action sources, random search, and the method registry used by evaluation.

    src = build_source("fixed")                       # any ActionSource: rollout, generate, score
    src = build_source("uniform:13")                  # action 13 on every controlled step
    src = build_source("policy", policy=net)          # the trained policy (greedy by default)
    found = random_search(sol, val_contexts, [(0.6, 0.6, 0.6)], n=30)     # fit on validation data
    src = build_source("random-search", target=(0.6, 0.6, 0.6), searched=found)

Methods (`METHODS`; the registry name -> ActionSource factory is `build_source`):
  policy         the trained PolicyNet (runtime/policy.py), greedy unless asked to sample.
  fixed          runtime.schedulers.Fixed: per axis, round-robin between the two grid levels nearest
                 the target, so the realized budget matches it to within one step.
  random         runtime.schedulers.Random: Fixed's levels shuffled per axis (same realized budget).
  random-search  best of N (default 30) Random schedules: each is scored on calibration contexts
                 (the validation split) by the mean log-likelihood of its controlled steps, the best
                 one is kept and then applied as a fixed schedule (evaluation scores it on the test
                 split). One search per budget target.
  uniform:<i>    action i of the action space on every controlled step (index, see ActionSpace).

Cost-budget baselines (a target is one cost fraction, runtime/budget.py; matched to the policy's
realized cost, training/cost_eval.py):
  best static    `lower_hull` (runtime.schedulers) of the uniform actions (cost vs validation NLL,
                 `uniform_nll`); `HullMix` interleaves the two hull actions around the target so the
                 mix costs exactly it.
  fixed / random `AtCost(Fixed() | Random(), costs)`: the paper's schedules at the equal per-axis target
                 whose Fixed schedule costs closest to the request (`equal_keep_costs`).
  search         `search_at_cost`: the best of N random two-action schedules at the cost
                 (`cost_schedules`), chosen on validation contexts, then run as a fixed schedule.

`Composite` runs several sources side by side in one batch (row r is served by source r % G), so one
shared-prefill rollout (training/episodes.py, group=G) scores every method and budget on the same
contexts. `SharedRows` makes a row-independent source pick one schedule for all its rows.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import Tensor

from runtime.actions import AXES, ActionSpace
from runtime.schedulers import ActionSource, Fixed, HullMix, Random, Schedule, hull_mix, lower_hull  # noqa: F401  (re-exported)
from training.episodes import rollout

METHODS = ("policy", "fixed", "random", "random-search", "uniform:<index>")


class Uniform(ActionSource):
    """One action on every controlled step (dense where forced)."""

    def __init__(self, index: int):
        self.index = int(index)

    def reset(self, space, batch, targets, horizon, generator=None):
        if not 0 <= self.index < len(space):
            raise ValueError(f"uniform action {self.index} is outside 0..{len(space) - 1}")
        super().reset(space, batch, targets, horizon, generator)

    def next_actions(self, step, hidden, token_embedding, dense):
        return self._with_dense(torch.full((self.batch,), self.index, dtype=torch.long, device=dense.device), dense)


class CyclicSchedule(ActionSource):
    """One schedule [T] for every row, consumed by controlled steps only (like Fixed: forced-dense steps
    do not use it up) and repeated if an episode is longer than T."""

    def __init__(self, schedule: Tensor):
        self.schedule = torch.as_tensor(schedule, dtype=torch.long).reshape(-1)
        if self.schedule.numel() == 0:
            raise ValueError("CyclicSchedule needs a non-empty schedule")

    def reset(self, space, batch, targets, horizon, generator=None):
        if int(self.schedule.min()) < 0 or int(self.schedule.max()) >= len(space):
            raise ValueError(f"schedule holds action indices outside 0..{len(space) - 1}")
        super().reset(space, batch, targets, horizon, generator)
        self._cursor = torch.zeros(batch, dtype=torch.long)

    def next_actions(self, step, hidden, token_embedding, dense):
        dense = dense.bool()
        if self._cursor.device != dense.device:  # state moves to the device once: no host reads per step
            self.schedule, self._cursor = self.schedule.to(dense.device), self._cursor.to(dense.device)
        picked = self.schedule[self._cursor % len(self.schedule)]
        self._cursor = self._cursor + (~dense).long()
        return self._with_dense(picked, dense)


class SharedRows(ActionSource):
    """Wraps a source whose picks do not depend on the row's inputs (Fixed, Random, a schedule): the
    inner source runs for one row (the first row's target) and every row gets its actions. Used where
    rows must share one schedule, e.g. the answer choices of one multiple-choice question."""

    def __init__(self, inner: ActionSource):
        self.inner = inner

    def reset(self, space, batch, targets, horizon, generator=None):
        targets = torch.as_tensor(targets, dtype=torch.float64).expand(batch, 3)
        super().reset(space, batch, targets, horizon, generator)
        self.inner.reset(space, 1, targets[:1], horizon, generator)

    def next_actions(self, step, hidden, token_embedding, dense):
        dense = dense.bool()
        one = self.inner.next_actions(step, hidden[:1], token_embedding[:1], dense[:1])
        return self._with_dense(one.expand(self.batch).clone(), dense)


class Composite(ActionSource):
    """G sources side by side: row r is served by source r % G, so with rollout(group=G) every context
    is scored by every source. targets: [B, 3] per row (source g gets rows g, g+G, ...)."""

    def __init__(self, sources: Sequence[ActionSource]):
        if not sources:
            raise ValueError("Composite needs at least one source")
        self.sources = list(sources)

    def reset(self, space, batch, targets, horizon, generator=None):
        G = len(self.sources)
        if batch % G:
            raise ValueError(f"a batch of {batch} rows does not split over {G} sources")
        targets = torch.as_tensor(targets, dtype=torch.float64).expand(batch, 3)
        super().reset(space, batch, targets, horizon, generator)
        for g, src in enumerate(self.sources):
            src.reset(space, batch // G, targets[g::G].contiguous(), horizon, generator)

    def next_actions(self, step, hidden, token_embedding, dense):
        G = len(self.sources)
        out = torch.empty(self.batch, dtype=torch.long, device=hidden.device)
        for g, src in enumerate(self.sources):
            out[g::G] = src.next_actions(step, hidden[g::G], token_embedding[g::G], dense[g::G]).to(hidden.device)
        return out


# -- random search ----------------------------------------------------------------------------------
def target_key(target) -> tuple[float, float, float]:
    """A hashable per-axis target (attn, mlp, bits/16) from one number or three."""
    t = torch.as_tensor(target, dtype=torch.float64).reshape(-1)
    if t.numel() == 1:
        t = t.repeat(3)
    if t.numel() != 3:
        raise ValueError(f"a target is one number or three (attn, mlp, bits/16), got {target!r}")
    return tuple(round(float(x), 6) for x in t)


def axis_targets(space: ActionSpace, budget) -> tuple[float, float, float]:
    """Per-axis target for a requested budget; disabled axes always run dense (1.0)."""
    key = target_key(budget)
    return tuple(key[i] if axis in space.axes else 1.0 for i, axis in enumerate(AXES))


def random_schedules(space: ActionSpace, target, n: int, horizon: int, generator: torch.Generator | None = None) -> Tensor:
    """[n, horizon] schedules of the Random baseline at `target` (Fixed's levels, shuffled per axis)."""
    src = Random()
    src.reset(space, n, torch.tensor(target_key(target), dtype=torch.float64).expand(n, 3), horizon, generator)
    zeros, no = torch.zeros(n, 1), torch.zeros(n, dtype=torch.bool)
    return torch.stack([src.next_actions(t, zeros, zeros, no) for t in range(horizon)], 1)


@torch.no_grad()
def score_schedules(sol, contexts: Tensor, schedules: Tensor, horizon: int, max_rows: int = 160,
                    on_progress: Callable[[int], None] | None = None) -> Tensor:
    """[S] mean log-likelihood of the controlled steps of each schedule [S, horizon] over all `contexts`
    (the training episode protocol; one shared prefill per context)."""
    S = schedules.shape[0]
    per_chunk = max(1, max_rows // S)
    total = torch.zeros(S, dtype=torch.float64)
    for lo in range(0, contexts.shape[0], per_chunk):
        ctx = contexts[lo : lo + per_chunk]
        ep = rollout(sol, ctx, Schedule(schedules.repeat(ctx.shape[0], 1)), torch.ones(3), group=S, horizon=horizon)
        total += ep.mean_logp().double().view(ctx.shape[0], S).sum(0).cpu()
        if on_progress is not None:
            on_progress(ctx.shape[0])
    return total / contexts.shape[0]


@dataclass
class SearchResult:
    target: tuple[float, float, float]
    schedules: Tensor  # [N, T] the candidates
    scores: Tensor  # [N] their mean log-likelihood on the calibration contexts
    best: int

    @property
    def schedule(self) -> Tensor:
        return self.schedules[self.best]


def random_search(sol, contexts: Tensor, targets: Sequence, n: int = 30, horizon: int = 16, seed: int = 0,
                  max_rows: int = 160, on_progress: Callable[[int], None] | None = None) -> dict[tuple, SearchResult]:
    """Best of `n` Random schedules per target, chosen by mean log-likelihood on `contexts` (pass the
    validation split: the search must not see the contexts it is scored on). All targets' candidates
    are scored together, sharing each context's prefill."""
    if n < 1:
        raise ValueError(f"random search needs n >= 1 candidates, got {n}")
    keys = list(dict.fromkeys(target_key(t) for t in targets))
    gen = torch.Generator().manual_seed(seed)
    cands = [random_schedules(sol.space, key, n, horizon, gen) for key in keys]
    scores = score_schedules(sol, contexts, torch.cat(cands), horizon, max_rows, on_progress).view(len(keys), n)
    return {key: SearchResult(key, cand, s, int(s.argmax())) for key, cand, s in zip(keys, cands, scores)}


def cost_schedules(costs: Tensor, target: float, n: int, horizon: int,
                   generator: torch.Generator | None = None) -> Tensor:
    """[n, horizon] random schedules whose mean cost (under `costs` [A]) is `target` to within one step:
    each mixes a random action at or below the target with a random one at or above it, as many steps
    of each as hit the target, in a random order. Unlike the hull mix, any pair of actions can be drawn,
    so a search over them can find pairs whose NLL is better than the hull's (NLL is not additive)."""
    costs = torch.as_tensor(costs, dtype=torch.float64)
    lo_cost, hi_cost = float(costs.min()), float(costs.max())
    if not lo_cost - 1e-9 <= target <= hi_cost + 1e-9:
        raise ValueError(f"target cost {target:.4f} outside the actions' range [{lo_cost:.4f}, {hi_cost:.4f}]")
    below = torch.nonzero(costs <= target + 1e-12).flatten()
    above = torch.nonzero(costs >= target - 1e-12).flatten()
    out = torch.empty(n, horizon, dtype=torch.long)
    for i in range(n):
        lo = int(below[torch.randint(len(below), (1,), generator=generator)])
        hi = int(above[torch.randint(len(above), (1,), generator=generator)])
        span = float(costs[hi] - costs[lo])
        k_hi = round(horizon * (target - float(costs[lo])) / span) if span > 0 else 0
        row = torch.tensor([hi] * k_hi + [lo] * (horizon - k_hi))
        out[i] = row[torch.randperm(horizon, generator=generator)]
    return out


def search_at_cost(sol, contexts: Tensor, costs: Tensor, targets: Sequence[float], n: int = 16, horizon: int = 16,
                   seed: int = 0, max_rows: int = 160, on_progress: Callable[[int], None] | None = None) -> list[SearchResult]:
    """Random search over schedules at a cost: per target, the best of `n` `cost_schedules` by mean
    log-likelihood on `contexts` (the validation split). All candidates share each context's prefill."""
    if n < 1:
        raise ValueError(f"random search needs n >= 1 candidates, got {n}")
    gen = torch.Generator().manual_seed(seed)
    cands = [cost_schedules(costs, float(t), n, horizon, gen) for t in targets]
    scores = score_schedules(sol, contexts, torch.cat(cands), horizon, max_rows, on_progress).view(len(cands), n)
    return [SearchResult((float(t), 1.0, 1.0), c, s, int(s.argmax())) for t, c, s in zip(targets, cands, scores)]


# -- baselines matched to realized budgets ---------------------------------------------------------
@dataclass
class MatchedBaselines:
    """Fixed and Random run at given per-episode budgets (`matched_baselines`)."""
    fixed_loglik: Tensor  # [C, M] mean log-likelihood of the controlled steps
    random_loglik: Tensor  # [C, M] the same, mean over the Random draws
    fixed_budget: Tensor  # [C, M, 3] realized per axis
    random_budget: Tensor  # [C, M, 3] realized per axis, mean over the draws


@torch.no_grad()
def matched_baselines(sol, contexts: Tensor, budgets: Tensor, horizon: int, random_draws: int = 4,
                      seed: int = 0, max_rows: int = 160,
                      on_progress: Callable[[int], None] | None = None) -> MatchedBaselines:
    """Fixed and Random at the budgets another method REALIZED: `budgets` [C, M, 3] holds M episodes'
    realized per-axis budgets on each of the C `contexts` (e.g. a policy's greedy and sampled
    episodes). Each episode's budget becomes the target of one Fixed episode and `random_draws` Random
    episodes on the same context, all M*(1+draws) rows sharing the context's prefill, so a paired
    difference per episode compares schedules at the same budget (up to whole-step rounding, which
    the returned realized budgets show)."""
    if random_draws < 1:
        raise ValueError(f"random_draws must be >= 1, got {random_draws}")
    C, M, _ = budgets.shape
    if contexts.shape[0] != C:
        raise ValueError(f"budgets are for {C} contexts, got {contexts.shape[0]} contexts")
    G = M * (1 + random_draws)  # rows per context: per episode, Fixed then its Random draws
    per_chunk = max(1, max_rows // G)
    ll = torch.zeros(C, M, 1 + random_draws, dtype=torch.float64)
    realized = torch.zeros(C, M, 1 + random_draws, 3, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    for lo in range(0, C, per_chunk):
        ctx = contexts[lo : lo + per_chunk]
        c = ctx.shape[0]
        targets = budgets[lo : lo + c].double().repeat_interleave(1 + random_draws, dim=1).reshape(c * G, 3)
        sources = [Fixed() if r % (1 + random_draws) == 0 else Random() for r in range(G)]
        ep = rollout(sol, ctx, Composite(sources), targets, group=G, horizon=horizon, generator=gen)
        ll[lo : lo + c] = ep.mean_logp().double().cpu().view(c, M, 1 + random_draws)
        realized[lo : lo + c] = ep.budget.double().cpu().view(c, M, 1 + random_draws, 3)
        if on_progress is not None:
            on_progress(c)
    return MatchedBaselines(ll[..., 0], ll[..., 1:].mean(-1), realized[:, :, 0], realized[:, :, 1:].mean(2))


# -- cost-budget baselines -------------------------------------------------------------------------
def equal_keep_costs(space: ActionSpace, costs: Tensor, horizon: int, resolution: int = 1000) -> tuple[Tensor, Tensor]:
    """(r [R], cost [R]): the mean cost (under `costs` [A], e.g. BudgetSpec.table(space)[:, 0]) of the
    paper's Fixed schedule at the same per-axis target r on every axis, for r on a grid over [0, 1]."""
    r = torch.linspace(0, 1, resolution + 1, dtype=torch.float64)
    src = Fixed()
    src.reset(space, len(r), r[:, None].expand(-1, 3), horizon)
    sched = src._sched
    return r, torch.as_tensor(costs, dtype=torch.float64)[sched].mean(1)


class AtCost(ActionSource):
    """The paper's Fixed or Random at a cost budget: each row's cost target (column 0) becomes the equal
    per-axis target r whose Fixed schedule costs closest to it (`equal_keep_costs`); Random shuffles
    the same levels, so both realize the same cost."""

    def __init__(self, inner: Fixed, costs: Tensor):
        self.inner, self.costs = inner, torch.as_tensor(costs, dtype=torch.float64)

    def reset(self, space, batch, targets, horizon, generator=None):
        targets = torch.as_tensor(targets, dtype=torch.float64).expand(batch, 3)
        super().reset(space, batch, targets, horizon, generator)
        r, cost = equal_keep_costs(space, self.costs, horizon)
        pick = (cost[None, :] - targets[:, :1]).abs().argmin(1)
        self.inner.reset(space, batch, r[pick][:, None].expand(-1, 3).contiguous(), horizon, generator)

    def next_actions(self, step, hidden, token_embedding, dense):
        return self.inner.next_actions(step, hidden, token_embedding, dense)


@torch.no_grad()
def uniform_nll(sol, contexts: Tensor, horizon: int, max_rows: int = 160,
                on_progress: Callable[[int], None] | None = None) -> Tensor:
    """[A] mean NLL (nats/token) of each uniform action on `contexts` (the episode protocol)."""
    A = len(sol.space)
    schedules = torch.arange(A)[:, None].expand(A, horizon)
    return -score_schedules(sol, contexts, schedules, horizon, max_rows, on_progress)


# -- registry ---------------------------------------------------------------------------------------
def build_source(name: str, *, target=None, policy=None, searched: dict | None = None, greedy: bool = True,
                 temperature: float | None = None) -> ActionSource:
    """A fresh ActionSource for method `name` (see METHODS). `target` is needed by random-search (which
    of the `searched` results to run); the others read their target at reset, like every source."""
    if name == "policy":
        if policy is None:
            raise ValueError("method 'policy' needs policy= (a PolicyNet)")
        from runtime.policy import PolicySource

        return PolicySource(policy, greedy=greedy, temperature=temperature)
    if name == "fixed":
        return Fixed()
    if name == "random":
        return Random()
    if name == "random-search":
        if searched is None or target is None:
            raise ValueError("method 'random-search' needs searched= (random_search's result) and target=")
        key = target_key(target)
        if key not in searched:
            raise ValueError(f"no random search was run for target {key}; searched: {sorted(searched)}")
        return CyclicSchedule(searched[key].schedule)
    if name.startswith("uniform:"):
        index = name.split(":", 1)[1]
        if not index.isdigit():
            raise ValueError(f"uniform needs an action index, e.g. 'uniform:13', got {name!r}")
        return Uniform(int(index))
    raise ValueError(f"unknown method {name!r}; valid choices: {list(METHODS)}")
