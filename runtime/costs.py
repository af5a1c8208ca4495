"""The measured cost table: latency of each action's decode step relative to dense, on this device.

A budget stated in fractions (keep, bits/16) says what the paper counts; the cost table says what a
schedule really costs here, so a realized schedule can be priced in time (`CostTable.predict`).
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

from runtime.dispatch import StepDispatcher

VERSION = 1


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


@torch.no_grad()
def calibrate_costs(sol, batch: int = 1, context: int = 256, repeats: int = 10, warmup: int = 2,
                    dispatcher: StepDispatcher | None = None, seed: int = 0) -> CostTable:
    """Time one decode step per action at `context` tokens of cache; stores the table on `sol`."""
    if context + 1 > sol.max_seq_len:
        raise ValueError(f"context={context} needs max_seq_len > {context}, compiled with {sol.max_seq_len}")
    device = sol.graph.solc_action_levels.device
    vocab = sol.token_embedding.shape[0]
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, context + 1), generator=gen).to(device)
    cache = sol.new_cache(batch, context + 1, device=device)
    sol(ids[:, :context], None, torch.arange(context, device=device).expand(batch, context), cache)
    dispatcher = dispatcher or StepDispatcher(sol)
    feed, pos = ids[:, context:], torch.full((batch, 1), context, device=device)
    latency = []
    for action in range(len(sol.space)):
        acts = torch.full((batch, 1), action, device=device)
        times = []
        for i in range(warmup + repeats):
            _sync(device)
            start = time.perf_counter()
            dispatcher.step(feed, acts, pos, cache)  # rewrites the same cache slot every time
            _sync(device)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1e3)
        latency.append(statistics.median(times))
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    table = CostTable(name, batch, context, latency)
    sol.cost_table = table
    return table
