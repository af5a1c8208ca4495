"""What the caller of a step knows on the host before the step runs, told to the solc:: ops so that they
need not ask the device.

A dispatcher variant runs ONE action on every row, so its levels are host constants; the stepper knows
the furthest position a step writes. An op that reads a `StepHints` picks its path (dense shortcut,
sparse path, kernel bucket) from these numbers instead of synchronising on `keep`/`bits`/`positions`
tensors. Without hints (the generic mixed-action graph, torch.export, a user calling the graph
directly) the ops read the tensors as before. Hints never change results: they are promises that are
true of the step's tensors (tests check every path against the reference with and without them).

    with step_hints(StepHints(attn=0.1, mlp=1.0, bits=16, kv_len=513)):
        graph(ids, positions, actions, *cache)
"""
from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Iterator, Optional


@dataclass(frozen=True)
class StepHints:
    attn: Optional[float] = None  # attn keep of every row of every token, None when not uniform
    mlp: Optional[float] = None  # mlp keep of every row, None when not uniform
    bits: Optional[int] = None  # bit level of every row, None when not uniform
    kv_len: Optional[int] = None  # max(positions) + 1: keys visible to the furthest query

    @property
    def attn_dense(self) -> Optional[bool]:
        return None if self.attn is None else self.attn >= 1.0

    @property
    def mlp_dense(self) -> Optional[bool]:
        return None if self.mlp is None else self.mlp >= 1.0

    @property
    def bits_dense(self) -> Optional[bool]:
        return None if self.bits is None else self.bits >= 16


_CURRENT: contextvars.ContextVar[Optional[StepHints]] = contextvars.ContextVar("solc_step_hints", default=None)


def current() -> Optional[StepHints]:
    """The hints of the step running now, or None (read the tensors)."""
    return _CURRENT.get()


@contextlib.contextmanager
def step_hints(hints: Optional[StepHints]) -> Iterator[None]:
    token = _CURRENT.set(hints)
    try:
        yield
    finally:
        _CURRENT.reset(token)
