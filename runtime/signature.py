"""The calling convention of the rewritten graph, defined once.

    graph(input_ids [B,T], position_ids [B,T], actions [B,T], k_cache_0, v_cache_0, page_min_0, page_max_0, k_cache_1, ...)

`SOLModel`, the step dispatcher (whose variants drop `actions`) and export read this object instead of
spelling the order out, so adding a per-layer cache tensor changes `CACHE_PARTS` and nothing else.
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from runtime.kv_cache import CACHE_PARTS, StaticKVCache

STEP_INPUTS = ("input_ids", "position_ids", "actions")
ACTIONS_INPUT = "actions"
# Which dimension of each cache part grows with what (dim 0 is always the batch).
CACHE_GROWS = {"k_cache": (2, "kv_len"), "v_cache": (2, "kv_len"), "page_min": (2, "pages"), "page_max": (2, "pages")}


@dataclass(frozen=True)
class StepSignature:
    """Input names and order of one step of the graph: `inputs`, then `cache_parts` of every layer."""

    inputs: tuple[str, ...]
    cache_parts: tuple[str, ...]
    n_layers: int

    @classmethod
    def for_layers(cls, n_layers: int) -> "StepSignature":
        return cls(STEP_INPUTS, CACHE_PARTS, n_layers)

    @property
    def cache_names(self) -> tuple[str, ...]:
        return tuple(f"{part}_{layer}" for layer in range(self.n_layers) for part in self.cache_parts)

    @property
    def names(self) -> tuple[str, ...]:
        """Every graph input, in order."""
        return self.inputs + self.cache_names

    @property
    def variant_names(self) -> tuple[str, ...]:
        """The inputs of a dispatcher variant (the graph with `actions` folded to a constant)."""
        return tuple(n for n in self.names if n != ACTIONS_INPUT)

    def check(self, graph) -> None:
        """Raise if an fx graph's placeholders are not this signature's inputs, in order."""
        found = tuple(n.target for n in graph.graph.nodes if n.op == "placeholder")
        if found != self.names:
            raise ValueError(f"the rewritten graph takes {list(found)}; the step signature expects {list(self.names)}")

    def args(self, input_ids: Tensor, position_ids: Tensor, actions: Tensor, cache: StaticKVCache) -> tuple:
        """Positional arguments of the full graph."""
        self._check_cache(cache)
        return (input_ids, position_ids, actions, *cache.tensors)

    def variant_args(self, input_ids: Tensor, position_ids: Tensor, cache: StaticKVCache) -> tuple:
        """Positional arguments of a variant (no `actions`)."""
        self._check_cache(cache)
        return (input_ids, position_ids, *cache.tensors)

    def cache_dims(self) -> list[tuple[int, str]]:
        """(dimension, name) of each cache tensor's growing dimension, in input order (for export's
        dynamic shapes: the batch is dimension 0 of every input)."""
        return [CACHE_GROWS[part] for _ in range(self.n_layers) for part in self.cache_parts]

    def _check_cache(self, cache: StaticKVCache) -> None:
        expected = self.n_layers * len(self.cache_parts)
        if len(cache.tensors) != expected:
            raise ValueError(f"the cache holds {len(cache.tensors)} tensors; the step signature needs {expected} "
                             f"({self.n_layers} layers x {list(self.cache_parts)})")
