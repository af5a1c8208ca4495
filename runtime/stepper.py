"""The controlled-step protocol, in one place: generate, score, training rollouts, multiple choice and
the lm-eval adapter are thin drivers over a `Stepper`.

    stepper = Stepper(sol, source)                       # any ActionSource (policy, Fixed, Schedule, ..)
    stepper.prefill(prefix_ids, steps, lengths=..., repeats=K, targets=..., generator=g)
    for t in range(steps):
        out = stepper.step(feed)                         # feed [B]: the token each row feeds now
        out.logprob(next_tokens)                         # [B] log p(next token) under the action that ran
    stepper.actions, stepper.controlled, stepper.budget()    # what ran, and its realized budget

Protocol. Row r's prefix ids[r, :lengths[r]] is prefilled densely at positions 0..lengths[r]-1 (in
chunks of PREFILL_CHUNK, with its neighbouring rows of the same length only). Controlled step t feeds
one token per row at position lengths[r] + t with the action its source picked from the previous
token's last-layer hidden state and the fed token's embedding; the step's logits predict the row's next
token. So every predicted token comes from exactly one action. Positions below DENSE_PREFIX always run
dense and count in no budget.

Ragged rows. A row's tokens always sit at positions 0.. of its own, and each run of rows of one
length is prefilled on its own, over that length: a row's prefill is then the same computation as the
prompt's alone. (Prefilling the padded width instead ran the row's linears and attention as GEMMs of
another shape: fp32 noise that a channel or page top-k downstream turned into up to 3.4 nats/token on
SmolLM2.) Cache positions past a row's prefix hold whatever an earlier call left there. No query ever
sees those keys: a query at position p attends to keys <= p, and a row's step t writes its key at
lengths[r] + t before its query reads. Quest's page statistics stay exact for the same reason: the page
holding p is recomputed over the keys <= p at every decode step, and earlier pages hold only real keys.
kv_len and the visible pages of a query are p + 1 and p // 8 + 1 of its own row. So a padded row
decodes as the same prompt alone, bit for bit.

Log-probs are computed in the model's dtype, at least float32 (an fp64 model gives fp64 log-probs).

Host syncs. One per step: the actions the source picked are read (min, max, and whether any row is
still active, in one transfer) to pick the dispatcher variant. Positions, the dense-prefix flags and
kv_len are host-known; sources, sampling and EOS keep their state on the device.
"""
from __future__ import annotations

import contextlib
import gc
from dataclasses import dataclass
from typing import Sequence

import torch
from torch import Tensor

from runtime.actions import AXES
from runtime.budget import BudgetSpec
from runtime.costs import BudgetMeter
from runtime.kv_cache import StaticKVCache, repeat_rows
from runtime.schedulers import DENSE_PREFIX, ActionSource, Fixed, Schedule
from runtime.signature import StepSignature  # noqa: F401  (re-exported: the graph's calling convention)

PREFILL_CHUNK = 512  # bounds the [B, H, chunk, kv_len] attention scores of long prompts


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for a decode loop (restored after, as it was). A full
    collection walks every object in the process: ~600k once SmolLM2 is loaded and compiled, ~280 ms on
    the dev machine (AMD EPYC, 2026-12-07), and the steps' allocations set one off every ~300 steps,
    ~1 ms a step on average, all of it landing on one token. The loops make no cyclic garbage (a
    generate of 64 tokens: none found after); whatever else does is collected once the loop ends."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _runs_of_equal_length(lengths: Sequence[int]) -> list[tuple[int, int]]:
    """[a, b) spans of consecutive rows whose prefixes have one length."""
    runs, a = [], 0
    for r in range(1, len(lengths) + 1):
        if r == len(lengths) or lengths[r] != lengths[a]:
            runs.append((a, r))
            a = r
    return runs


def logprob_dtype(model_dtype: torch.dtype) -> torch.dtype:
    """The dtype log-probs are computed in: the model's, at least float32."""
    return torch.promote_types(model_dtype, torch.float32)


def budget_targets(budget, batch: int) -> Tensor:
    """A budget as [B, 3] per-axis cost targets: one number for all axes, a dict per axis, or [3]/[B, 3]."""
    if isinstance(budget, dict):
        unknown = set(budget) - set(AXES)
        if unknown:
            raise ValueError(f"budget has unknown axes {sorted(unknown)}; valid axes: {list(AXES)}")
        budget = [float(budget.get(axis, 1.0)) for axis in AXES]
    t = torch.as_tensor(budget, dtype=torch.float64)
    if t.dim() == 0:
        t = t.repeat(3)
    t = t.expand(batch, 3) if t.dim() == 1 else t
    if t.shape != (batch, 3) or not bool(((t > 0) & (t <= 1)).all()):
        raise ValueError(f"budget must be in (0, 1] (a number, a per-axis dict, [3] or [{batch}, 3]); got {budget!r}")
    return t


def resolve_source(space, policy: ActionSource | None, schedule, budget, steps: int) -> ActionSource:
    """Who picks the actions: `policy`, else `schedule` ([B, N] or [N] action indices), else Fixed at
    `budget`, else dense on every step."""
    if policy is not None and schedule is not None:
        raise ValueError("pass either policy= or schedule=, not both")
    if policy is not None:
        return policy
    if schedule is not None:
        return Schedule(schedule)
    if budget is not None:
        return Fixed()
    return Schedule(torch.full((steps,), space.dense_index))


@dataclass
class StepOut:
    """One controlled step of every row."""

    logits: Tensor  # [B, V] in the log-prob dtype
    hidden: Tensor  # [B, d] last-layer hidden state of the fed token (the source's next input)
    actions: Tensor  # [B] the action each row ran (-1 on an inactive row)
    controlled: Tensor  # [B] bool: counted in the budget (not forced dense, row active)

    def logprobs(self) -> Tensor:
        """[B, V] log-softmax of the step's logits."""
        return torch.log_softmax(self.logits, dim=-1)

    def logprob(self, tokens: Tensor) -> Tensor:
        """[B] log p(tokens) under the step's distribution."""
        return self.logprobs().gather(-1, tokens.reshape(-1, 1)).squeeze(-1)


class Stepper:
    """Owns one decode session: its cache and positions, the dense prefix, the action source and the
    dispatcher that runs the steps, the log-prob dtype and the record of the actions that ran."""

    def __init__(self, sol, source: ActionSource | None = None, dispatcher=None, budget_spec: BudgetSpec | None = None):
        self.sol = sol
        self.source = source
        # what a target means and how the realized budget is priced: given, else the source's own (a
        # trained policy's), else the paper's per-axis budget
        self.budget_spec = budget_spec or getattr(source, "budget_spec", None) or BudgetSpec.per_axis()
        self.dispatcher = dispatcher if dispatcher is not None else sol.dispatcher
        self.dtype = logprob_dtype(sol.dtype)
        self.device = sol.token_embedding.device
        self.cache = None

    # -- prefill -----------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, ids: Tensor, steps: int, *, lengths: Sequence[int] | None = None, repeats: int = 1,
                targets=None, generator=None) -> None:
        """Prefill every row's prefix densely and get ready for `steps` controlled steps.

        ids [B0, L]: row r's prefix is ids[r, :lengths[r]] (default: all L tokens; 0 is allowed, then
        the first step runs at position 0 with a zero hidden state). repeats: each prefilled row
        continues as `repeats` consecutive rows (K schedules sharing one prefill), so the steps run
        B = B0 * repeats rows. targets: [B, 3] per-axis budget targets the source aims at (default
        1.0), or anything `budget_targets` reads. `generator` goes to `source.reset`."""
        if ids.dim() != 2:
            raise ValueError(f"ids must be [batch, prefix_len], got shape {tuple(ids.shape)}")
        if steps < 1:
            raise ValueError(f"steps must be >= 1, got {steps}")
        if repeats < 1:
            raise ValueError(f"repeats must be >= 1, got {repeats}")
        rows, width = ids.shape
        lengths = [width] * rows if lengths is None else [int(n) for n in lengths]
        if len(lengths) != rows or any(not 0 <= n <= width for n in lengths):
            raise ValueError(f"lengths must be {rows} numbers in 0..{width}, got {lengths}")
        longest = max(lengths)
        need = longest + steps
        if need > self.sol.max_seq_len:
            raise ValueError(f"a prefix of {longest} tokens + {steps} steps needs {need} positions; "
                             f"exceeds max_seq_len={self.sol.max_seq_len}")
        batch = rows * repeats
        ids = ids.to(self.device)
        slot = "prefill" if repeats > 1 else "steps"
        cache = self.dispatcher.cache(slot, rows, need, device=self.device)
        hidden = torch.cat([self._prefill_rows(ids[a:b, :lengths[a]], cache.rows(a, b))
                            for a, b in _runs_of_equal_length(lengths)])
        if repeats > 1:
            cache = repeat_rows(cache, repeats, out=self.dispatcher.cache("steps", batch, need, device=self.device),
                                length=longest)
            hidden = hidden.repeat_interleave(repeats, dim=0)
            lengths = [n for n in lengths for _ in range(repeats)]
        self.cache, self.hidden, self.batch, self.steps, self.t = cache, hidden, batch, steps, 0
        self._start = torch.tensor(lengths, device=self.device)  # position of each row's step 0
        self._last_start = max(lengths)  # so kv_len of step t is host-known: last_start + t + 1
        if self.source is None:
            self.source = resolve_source(self.sol.space, None, None, None, steps)
        if isinstance(targets, Tensor) and targets.shape == (batch, 3):
            targets = targets.to(torch.float64)
        else:
            targets = self.budget_spec.targets(1.0 if targets is None else targets, batch, self.sol.space)
        self.source.reset(self.sol.space, batch, targets, steps, generator)
        self.targets = targets
        self._actions: list[Tensor] = []
        self._controlled: list[Tensor] = []
        self._kv_lens: list[Tensor] = []

    def _prefill_rows(self, ids: Tensor, cache: StaticKVCache) -> Tensor:
        """Prefill rows of one length n (ids [b, n]) in chunks of PREFILL_CHUNK; returns the last
        position's hidden state [b, d] (zeros for n == 0)."""
        rows, n = ids.shape
        hidden = torch.zeros(rows, self.sol.token_embedding.shape[1], dtype=self.sol.dtype, device=self.device)
        for lo in range(0, n, PREFILL_CHUNK):
            hi = min(lo + PREFILL_CHUNK, n)
            pos = torch.arange(lo, hi, device=self.device).expand(rows, hi - lo)
            hidden = self.dispatcher.prefill(ids[:, lo:hi], pos, cache, kv_len=hi)[:, -1]  # hidden [b, T, d]
        return hidden

    # -- steps -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, feed: Tensor, active: Tensor | None = None) -> StepOut | None:
        """One controlled step: feed [B] (one token per row). active [B] bool (optional, on the device):
        rows still running; inactive rows run but count in no budget and record action -1. Returns
        None, running nothing, when no row is active."""
        if self.cache is None:
            raise RuntimeError("Stepper.step before prefill")
        t = self.t
        if t >= self.steps:
            raise ValueError(f"the stepper was prefilled for {self.steps} steps; step {t + 1} does not fit")
        feed = feed.reshape(-1).to(self.device)
        positions = self._start + t
        dense = positions < DENSE_PREFIX
        actions = self.source.next_actions(t, self.hidden, self.sol.token_embedding[feed], dense).to(self.device)
        # The one host read of the step: which variant runs (and whether any row is still running).
        flags = [actions.min(), actions.max()] + ([active.any().to(actions.dtype)] if active is not None else [])
        lo, hi, *alive = torch.stack(flags).tolist()
        if alive and not alive[0]:
            return None
        logits, hidden = self.dispatcher.step(feed[:, None], actions[:, None], positions[:, None], self.cache,
                                              action=lo if lo == hi else None, kv_len=self._last_start + t + 1)
        controlled = ~dense
        if active is not None:
            controlled = controlled & active
            actions = torch.where(active, actions, torch.full_like(actions, -1))
        self._actions.append(actions)
        self._controlled.append(controlled)
        self._kv_lens.append(positions + 1)
        self.hidden = hidden[:, -1]
        self.t = t + 1
        return StepOut(logits[:, -1].to(self.dtype), self.hidden, actions, controlled)

    # -- what ran ----------------------------------------------------------------------------------
    @property
    def actions(self) -> Tensor:
        """[B, steps run] the action of every step (-1 where a row was inactive)."""
        return torch.stack(self._actions, 1)

    @property
    def controlled(self) -> Tensor:
        """[B, steps run] bool: counted in the budget."""
        return torch.stack(self._controlled, 1)

    @property
    def kv_lens(self) -> Tensor:
        """[B, steps run] keys each step attended (its own included): what its cost is priced at."""
        return torch.stack(self._kv_lens, 1)

    def budget(self, empty: float = 1.0) -> Tensor:
        """[B, 3] realized budget of each row in the spec's columns (`empty` for a row without
        controlled steps): per-axis means, or the realized cost fraction in column 0."""
        return self.budget_spec.realized(self.sol.space, self.actions, self.controlled, self.kv_lens, empty)

    def budget_summary(self) -> dict:
        """Pooled realized budget: per-axis mean cost over the controlled steps, net_keep, `cost` (the
        realized cost fraction, pooled over rows) in cost mode and, when the model has a measured cost
        table, the relative latency."""
        out = BudgetMeter(self.sol.space).add(self.actions, self.controlled).summary(
            self.sol.cost_table, self.actions, self.controlled)
        out["budget_mode"] = self.budget_spec.mode
        if self.budget_spec.is_cost:
            flat = lambda t: t.reshape(1, -1)  # noqa: E731  pool every row's steps into one
            pooled = self.budget_spec.realized(self.sol.space, flat(self.actions), flat(self.controlled),
                                               flat(self.kv_lens), float("nan"))
            out["cost"] = float(pooled[0, 0])
            out["cost_model"] = self.budget_spec.cost_model["kind"]  # which model priced it: measured or bytes
        return out
