"""The step dispatcher: one decode variant per action, owned in one place.

A variant is the model's rewritten graph with the `actions` input replaced by a constant, so every
solc:: op sees a fixed level (the kernels pick their specialised path, inductor folds the level
lookups). Keys are (action, batch): on CUDA each key is captured once as a CUDA graph and replayed; on
CPU each key is a `torch.compile(fullgraph=True)` program (or the plain graph in eager mode).
Steps whose rows picked different actions take the generic graph, which reads a per-row action
tensor: correct for any mix, without specialisation.
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx
from torch import Tensor

from runtime.kv_cache import StaticKVCache

MODES = ("eager", "compile", "cudagraph")


def specialize(gm: fx.GraphModule, action: int) -> fx.GraphModule:
    """A copy of `gm` (sharing its weights) whose `actions` input is the constant `action`."""
    graph = copy.deepcopy(gm.graph)
    actions = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "actions")
    ids = next(n for n in graph.nodes if n.op == "placeholder" and n.target == "input_ids")
    with graph.inserting_after(actions):
        const = graph.call_function(torch.ops.aten.full_like.default, (ids, action), {"dtype": torch.long})
    actions.replace_all_uses_with(const)
    graph.erase_node(actions)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"SOLStepAction{action}")


class _CudaGraphStep:
    """One captured CUDA graph: static inputs are copied in, the graph replays, outputs are static."""

    def __init__(self, fn, ids: Tensor, positions: Tensor, cache: StaticKVCache):
        self.ids, self.positions, self.cache = ids.clone(), positions.clone(), cache
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init)
            fn(self.ids, self.positions, *cache.tensors)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(self.ids, self.positions, *cache.tensors)

    def __call__(self, ids: Tensor, positions: Tensor, cache: StaticKVCache):
        if cache is not self.cache:
            raise ValueError("a CUDA-graph step replays on the cache it was captured with")
        self.ids.copy_(ids)
        self.positions.copy_(positions)
        self.graph.replay()
        return self.out


class StepDispatcher:
    """Runs decode steps of a SOLModel, one specialised variant per (action, batch)."""

    def __init__(self, sol, mode: str | None = None):
        if mode is None:
            mode = "cudagraph" if sol.graph.solc_action_levels.is_cuda else "eager"
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; valid choices: {list(MODES)}")
        self.sol, self.mode = sol, mode
        self._variants: dict[tuple[int, int], object] = {}
        self._generic = None

    @property
    def keys(self) -> list[tuple[int, int]]:
        """The (action, batch) keys captured so far."""
        return sorted(self._variants)

    def _variant(self, action: int, ids: Tensor, positions: Tensor, cache: StaticKVCache):
        key = (action, ids.shape[0])
        if key not in self._variants:
            gm = specialize(self.sol.graph, action)
            if self.mode == "compile":
                gm = torch.compile(gm, fullgraph=True, dynamic=False)
            if self.mode == "cudagraph":
                self._variants[key] = _CudaGraphStep(gm, ids, positions, cache)
            else:
                self._variants[key] = lambda i, p, c, fn=gm: fn(i, p, *c.tensors)
        return self._variants[key]

    def _generic_step(self, ids, actions, positions, cache):
        if self._generic is None:
            fn = self.sol.graph
            self._generic = torch.compile(fn, fullgraph=True, dynamic=False) if self.mode == "compile" else fn
        return self._generic(ids, positions, actions, *cache.tensors)

    def step(self, ids: Tensor, actions: Tensor, positions: Tensor, cache: StaticKVCache):
        """ids/actions/positions [B, 1] -> (logits [B, 1, V], hidden [B, 1, d])."""
        first = actions.reshape(-1)[0]
        # The host must know the action to pick a variant: this is the one sync per step.
        if bool((actions == first).all()):
            return self._variant(int(first), ids, positions, cache)(ids, positions, cache)
        return self._generic_step(ids, actions, positions, cache)
