"""What a schedule costs: the realized budget of the actions that ran, and the measured cost table.

Budget accounting lives here and only here (DESIGN invariant 4: the budget reported is the budget of
the actions that ran). Steps are counted when `controlled` (not forced dense, not after a row
finished); actions of -1 (nothing ran) are never counted.

    realized_budget(space, actions, controlled)   # [N, 3] per row, per axis (attn, mlp, bits/16)
    meter = BudgetMeter(space); meter.add(actions, controlled); meter.summary()   # pooled over calls

A budget stated in fractions (keep, bits/16) says what the paper counts; the cost table says what a
schedule really costs here, so a realized schedule can be priced in time (`CostTable.predict`).
"""
from __future__ import annotations

import numbers
import statistics
import time
from dataclasses import asdict, dataclass

import torch
from torch import Tensor

from runtime import validation
from runtime.actions import AXES
from runtime.cost_model import device_name
from runtime.dispatch import StepDispatcher
from runtime.errors import ArgumentError, ArgumentTypeError

VERSION = 1


def step_costs(space, actions: Tensor, controlled: Tensor) -> tuple[Tensor, Tensor]:
    """Per-axis cost of every counted step [..., 3] (zero where not counted) and the count weights [..., 1]."""
    costs = space.cost_table().to(actions.device)[actions.clamp(min=0)]
    weight = (controlled & (actions >= 0)).to(torch.float64)[..., None]
    return costs * weight, weight


def realized_budget(space, actions: Tensor, controlled: Tensor, empty: float = 1.0) -> Tensor:
    """[N, 3] float64 mean cost per axis over the counted steps of each row of actions [N, T]
    (`empty` where a row has none)."""
    costs, weight = step_costs(space, actions, controlled)
    n = weight.sum(1)
    return torch.where(n > 0, costs.sum(1) / n.clamp(min=1), torch.full_like(n, empty))


class BudgetMeter:
    """The realized budget pooled over every counted step of several calls (a task, an eval run)."""

    def __init__(self, space):
        self.space = space
        self.cost_sum = torch.zeros(3, dtype=torch.float64)
        self.steps = 0

    def add(self, actions: Tensor, controlled: Tensor) -> "BudgetMeter":
        costs, weight = step_costs(self.space, actions, controlled)
        self.cost_sum += costs.reshape(-1, 3).sum(0).cpu()
        self.steps += int(weight.sum())
        return self

    def mean(self) -> Tensor:
        """[3] mean cost per axis (NaN before any counted step)."""
        return self.cost_sum / self.steps if self.steps else torch.full((3,), float("nan"), dtype=torch.float64)

    def summary(self, cost_table: "CostTable | None" = None, actions: Tensor | None = None,
                controlled: Tensor | None = None) -> dict:
        """{axis: mean cost, net_keep: mean over the enabled axes} and, given a cost table and the
        actions, `latency`: the mean relative step latency of the counted steps."""
        mean = self.mean()
        out = {axis: float(mean[i]) for i, axis in enumerate(AXES)}
        out["net_keep"] = sum(out[a] for a in self.space.axes) / len(self.space.axes)
        if cost_table is not None and actions is not None and self.steps:
            out["latency"] = cost_table.predict(actions, controlled & (actions >= 0))
        return out


@dataclass
class CostTable:
    device: str
    batch: int
    context: int
    latency_ms: list[float]  # median decode-step latency of each action, index = action
    version: int = VERSION

    @property
    def relative(self) -> list[float]:
        dense = self.latency_ms[-1]  # the dense action is always last in an ActionSpace
        return [ms / dense for ms in self.latency_ms]

    def predict(self, actions: torch.Tensor, controlled: torch.Tensor | None = None) -> float:
        """Mean relative step latency of a realized schedule (over controlled steps if given)."""
        rel = torch.tensor(self.relative, dtype=torch.float64)[actions.clamp(min=0).cpu()]
        if controlled is not None:
            rel = rel[controlled.cpu()]
        return float(rel.mean())

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "CostTable":
        if d.get("version") != VERSION:
            raise ValueError(f"cost table version {d.get('version')!r} is not supported (expected {VERSION})")
        return cls(**d)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_cache(sol, dispatcher: StepDispatcher, batch: int, context: int, gen: torch.Generator):
    """Random token ids [batch, context + 1] and the dispatcher's "calibrate" cache prefilled with the
    first `context` of them: the cache a calibration step at position <= context reads."""
    device = sol.graph.solc_action_levels.device
    ids = torch.randint(0, sol.token_embedding.shape[0], (batch, context + 1), generator=gen).to(device)
    cache = dispatcher.cache("calibrate", batch, context + 1, device=device)
    dispatcher.prefill(ids[:, :context], torch.arange(context, device=device).expand(batch, context), cache, kv_len=context)
    return ids, cache


@torch.no_grad()
def _step_latencies(sol, dispatcher: StepDispatcher, batch: int, contexts: list[int], rounds: int, warmup: int,
                    gen: torch.Generator, progress: bool = False) -> list[list[float]]:
    """[bucket][action] median latency (ms) of one decode step with `contexts[i]` tokens of (random)
    cache. Every round times every (bucket, action) pair once, so drift on a shared machine hits all
    actions and all buckets alike (buckets timed one after another came out 20% apart on a 2-core box
    for the same dense step). One cache holds the longest bucket; a step at bucket c writes slot c and
    reads the first c + 1 positions."""
    device = sol.graph.solc_action_levels.device
    ids, cache = _random_cache(sol, dispatcher, batch, max(contexts), gen)
    times = [[[] for _ in sol.space] for _ in contexts]
    for r in range(warmup + rounds):
        for b, context in enumerate(contexts):
            feed, pos = ids[:, context:context + 1], torch.full((batch, 1), context, device=device)
            for action in range(len(sol.space)):
                acts = torch.full((batch, 1), action, device=device)
                _sync(device)
                start = time.perf_counter()
                dispatcher.step(feed, acts, pos, cache, action=action, kv_len=context + 1)
                _sync(device)
                if r >= warmup:
                    times[b][action].append((time.perf_counter() - start) * 1e3)
        if progress:
            print(f"calibrate: round {r + 1}/{warmup + rounds} ({warmup} warm-up)", flush=True)
    return [[statistics.median(t) for t in bucket] for bucket in times]


def calibrate_costs(sol, batch: int = 1, context: int = 256, repeats: int = 10, warmup: int = 2,
                    dispatcher: StepDispatcher | None = None, seed: int = 0) -> CostTable:
    """Time one decode step per action at `context` tokens of cache (`repeats` interleaved rounds);
    stores the table on `sol`."""
    batch = validation.check_int("batch", batch, 1)
    context = validation.check_int("context", context, 1, sol.max_seq_len - 1,
                                   f"a step at `context` cached tokens needs context + 1 <= max_seq_len={sol.max_seq_len}")
    repeats = validation.check_int("repeats", repeats, 1)
    warmup = validation.check_int("warmup", warmup, 0)
    seed = validation.check_seed(seed)
    (latency,) = _step_latencies(sol, dispatcher or StepDispatcher(sol), batch, [context], repeats, warmup,
                                 torch.Generator().manual_seed(seed))
    table = CostTable(device_name(sol.graph.solc_action_levels.device), batch, context, latency)
    sol.cost_table = table
    return table


@torch.no_grad()
def _decision_latency(sol, dispatcher: StepDispatcher, source, batch: int, context: int, rounds: int, warmup: int,
                      steps: int, gen: torch.Generator) -> float:
    """Median latency (ms) of one `source.next_actions` call as generate makes it: after a dense decode
    step (untimed) has streamed the model's weights, so the policy's weights are as cold as they are
    there. Each round is one episode of `steps` decisions from a fresh reset."""
    device = sol.graph.solc_action_levels.device
    space = sol.space
    spec = getattr(source, "budget_spec", None)
    if spec is not None and spec.is_cost:
        lo, hi = spec.feasible_range(space)
        targets = spec.targets((lo + hi) / 2, batch, space)
    else:
        from runtime.stepper import budget_targets

        targets = budget_targets(1.0, batch)
    ids, cache = _random_cache(sol, dispatcher, batch, context, gen)
    feed, pos = ids[:, context:], torch.full((batch, 1), context, device=device)
    emb = sol.token_embedding[feed[:, 0]]
    dense_action = torch.full((batch, 1), space.dense_index, device=device)
    not_dense = torch.zeros(batch, dtype=torch.bool, device=device)
    times: list[float] = []
    for r in range(warmup + rounds):
        source.reset(space, batch, targets, steps, None)
        for t in range(steps):
            _, hidden = dispatcher.step(feed, dense_action, pos, cache, action=space.dense_index, kv_len=context + 1)
            _sync(device)
            start = time.perf_counter()
            source.next_actions(t, hidden[:, -1], emb, not_dense)
            _sync(device)
            if r >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def _buckets(contexts, max_seq_len: int) -> list[int]:
    """The sorted distinct context buckets that fit max_seq_len (each an int >= 1; longer ones dropped)."""
    valid = "a non-empty list of ints >= 1, the cached tokens of each bucket (e.g. (256, 1024, 4096))"
    if not isinstance(contexts, (list, tuple, range)):
        validation.fail("contexts", contexts, valid, type_error=True)
    if not contexts:
        validation.fail("contexts", contexts, valid)
    for c in contexts:
        if isinstance(c, bool) or not isinstance(c, numbers.Integral) or c < 1:
            validation.fail("contexts", contexts, valid + f"; {c!r} is not")
    buckets = sorted({int(c) for c in contexts if int(c) + 1 <= max_seq_len})
    if not buckets:
        raise ArgumentError("contexts", f"contexts={list(contexts)}: none fits max_seq_len={max_seq_len} (a bucket "
                                        "needs context + 1 positions)")
    return buckets


def calibrate_cost_model(sol, contexts=(256, 1024, 4096), batch: int = 1, rounds: int = 7, warmup: int = 2,
                         dispatcher: StepDispatcher | None = None, seed: int = 0, progress: bool = False,
                         policy=None, decision_steps: int = 16):
    """Measure the cost model a cost budget is priced with on this device: the median latency of one
    decode step per action at each context bucket (kv_len), rounds interleaving actions and buckets
    (`_step_latencies`).
    Buckets beyond the compiled max_seq_len are dropped. Stores the runtime.cost_model.MeasuredCostModel
    on `sol.cost_model`, which generate/score/export then use; it is refused on another device or batch.

    policy (a runtime.policy.PolicyNet or any ActionSource): also time its decisions between decode
    steps at the first bucket (`rounds` episodes of `decision_steps` decisions) and store the median as
    `decision_ms`, so a policy-driven loop's wall time can be predicted (`predicted_decode_ms`)."""
    from runtime.cost_model import MeasuredCostModel
    from runtime.policy import PolicyNet, PolicySource
    from runtime.schedulers import ActionSource

    if isinstance(policy, PolicyNet):
        policy = PolicySource(policy, greedy=True)
    if policy is not None and not isinstance(policy, ActionSource):
        raise ArgumentTypeError("policy", "policy must be a PolicyNet or an ActionSource, got "
                                          f"{type(policy).__name__} ({validation._show(policy)})")
    if isinstance(decision_steps, bool) or not isinstance(decision_steps, int) or decision_steps < 1:
        raise ArgumentError("decision_steps", f"decision_steps must be an int >= 1, got {decision_steps!r}")
    batch = validation.check_int("batch", batch, 1)
    rounds = validation.check_int("rounds", rounds, 1)
    warmup = validation.check_int("warmup", warmup, 0)
    seed = validation.check_seed(seed)
    buckets = _buckets(contexts, sol.max_seq_len)
    device = sol.graph.solc_action_levels.device
    gen = torch.Generator().manual_seed(seed)
    dispatcher = dispatcher or StepDispatcher(sol)
    per_bucket = _step_latencies(sol, dispatcher, batch, buckets, rounds, warmup, gen, progress)
    if progress:
        dense = sol.space.dense_index
        print("calibrate: dense " + ", ".join(f"{c} keys {row[dense]:.2f}" for c, row in zip(buckets, per_bucket))
              + " ms/step", flush=True)
    latency = [list(row) for row in zip(*per_bucket)]  # [action][bucket]
    decision = None
    if policy is not None:
        decision = _decision_latency(sol, dispatcher, policy, batch, buckets[0], rounds, warmup, decision_steps, gen)
        if progress:
            print(f"calibrate: one policy decision {decision:.2f} ms", flush=True)
    model = MeasuredCostModel(device_name(device), batch, buckets, latency, decision_ms=decision)
    sol.cost_model = model
    return model
