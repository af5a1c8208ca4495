"""The step dispatcher: one decode variant per action, and the caches they run on, owned in one place.

A variant is the model's rewritten graph with the `actions` input replaced by a constant, so every
solc:: op sees a fixed level (the kernels pick their specialised path, inductor folds the level
lookups). Keys are (action, batch): on CUDA each key is captured once as a CUDA graph and replayed; on
CPU each key is a `torch.compile(fullgraph=True)` program (or the plain graph in eager mode).
Steps whose rows picked different actions take the generic graph, which reads a per-row action
tensor: correct for any mix, without specialisation.

Every step runs under `runtime.ops.step_hints`: a variant's levels are host constants, and the caller
(the stepper) knows the furthest position a step writes, so the ops need not ask the device. A
captured CUDA graph cannot depend on the step's length: it is told the whole cache is visible (the
queries' own positions still mask what each one sees).

The dispatcher also keeps the caches it runs on (`cache(slot, batch, max_len)`): a CUDA-graph variant
is tied to the cache it was captured with, so reusing the cache across calls is what lets a capture be
replayed instead of redone.
"""
from __future__ import annotations

import copy
import dataclasses

import torch
import torch.fx as fx
from torch import Tensor

from runtime.cpu_program import direct_cpu_calls
from runtime.kv_cache import StaticKVCache
from runtime.ops.step_hints import StepHints, step_hints
from runtime.signature import ACTIONS_INPUT

MODES = ("eager", "compile", "cudagraph")
_HINT_LEVELS = tuple(f.name for f in dataclasses.fields(StepHints) if f.name != "kv_len")
_READ = object()  # step(action=...) not given: read it from the actions tensor


def specialize(gm: fx.GraphModule, action: int) -> fx.GraphModule:
    """A copy of `gm` (sharing its weights) whose `actions` input is the constant `action`."""
    graph = copy.deepcopy(gm.graph)
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    actions = next(n for n in placeholders if n.target == ACTIONS_INPUT)
    ids = placeholders[0]  # input_ids: the constant takes its [B, T] shape
    with graph.inserting_after(actions):
        const = graph.call_function(torch.ops.aten.full_like.default, (ids, action), {"dtype": torch.long})
    actions.replace_all_uses_with(const)
    graph.erase_node(actions)
    graph.lint()
    return fx.GraphModule(gm, graph, class_name=f"SOLStepAction{action}")


class _EagerCPU:
    """An eager CPU program: the direct-call copy when autograd is off (decoding), else the op graph."""

    def __init__(self, gm: fx.GraphModule):
        self.gm, self.direct = gm, direct_cpu_calls(gm)

    def __call__(self, *args):
        return (self.gm if torch.is_grad_enabled() else self.direct)(*args)


def hidden_only(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of `gm` (sharing its weights) that returns only the hidden states [B, T, d]: the LM head
    and whatever feeds only the logits are dropped. A prefill chunk's logits are never read (the first
    controlled step scores the next token), and at T = 256 the LM head is 49152 x 576 x 256 MACs a row.
    The cache writes stay: solc::attention mutates its caches, so dead-code elimination keeps it."""
    graph = copy.deepcopy(gm.graph)
    out = next(n for n in graph.nodes if n.op == "output")
    logits, hidden = out.args[0]
    out.args = ((hidden,),)
    program = fx.GraphModule(gm, graph, class_name=type(gm).__name__ + "HiddenOnly")
    program.graph.eliminate_dead_code()  # needs the owning module (purity checks)
    program.graph.lint()
    program.recompile()
    return program


def action_hints(space, action: int | None, kv_len: int | None) -> StepHints:
    """What the host knows about a step: the levels of its one action (None: mixed), and kv_len."""
    if action is None:
        return StepHints(kv_len=kv_len)
    act = space[action]
    return StepHints(kv_len=kv_len, **{name: getattr(act, name) for name in _HINT_LEVELS if hasattr(act, name)})


class _CudaGraphStep:
    """One captured CUDA graph: static inputs are copied in, the graph replays, outputs are static."""

    def __init__(self, fn, ids: Tensor, positions: Tensor, cache: StaticKVCache, signature):
        self.ids, self.positions, self.cache = ids.clone(), positions.clone(), cache
        args = signature.variant_args(self.ids, self.positions, cache)
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up outside the graph (allocator, lazy init)
            fn(*args)
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*args)

    def __call__(self, ids: Tensor, positions: Tensor, cache: StaticKVCache):
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
        self.signature = sol.signature
        self._variants: dict[tuple[int, int], object] = {}
        self._generic = None
        self._caches: dict[str, StaticKVCache] = {}
        self._eager_cpu = mode == "eager" and not sol.graph.solc_action_levels.is_cuda
        self._prefill = None

    @property
    def keys(self) -> list[tuple[int, int]]:
        """The (action, batch) keys captured so far."""
        return sorted(self._variants)

    # -- caches ------------------------------------------------------------------------------------
    def cache(self, slot: str, batch: int, max_len: int, device=None) -> StaticKVCache:
        """The cache of `slot` ("steps", "prefill"), reused while it has `batch` rows and at least
        `max_len` positions; otherwise a new one (and the CUDA graphs captured on the old one go)."""
        device = torch.device(device) if device is not None else self.sol.graph.solc_action_levels.device
        held = self._caches.get(slot)
        if held is not None and held.batch == batch and held.max_len >= max_len and held.tensors[0].device == device:
            return held
        if held is not None:
            self._variants = {k: v for k, v in self._variants.items() if getattr(v, "cache", None) is not held}
        self._caches[slot] = self.sol.new_cache(batch, max_len, device=device)
        return self._caches[slot]

    def release_caches(self) -> None:
        """Drop the held caches (and the CUDA graphs captured on them)."""
        self._caches.clear()
        self._variants = {k: v for k, v in self._variants.items() if not hasattr(v, "cache")}

    # -- steps -------------------------------------------------------------------------------------
    def _variant(self, action: int, ids: Tensor, positions: Tensor, cache: StaticKVCache):
        key = (action, ids.shape[0])
        variant = self._variants.get(key)
        if variant is None or (self.mode == "cudagraph" and variant.cache is not cache):
            gm = specialize(self.sol.graph, action)
            if self.mode == "compile":
                gm = torch.compile(gm, fullgraph=True, dynamic=False)
            elif self._eager_cpu:
                gm = _EagerCPU(gm)
            if self.mode == "cudagraph":
                variant = _CudaGraphStep(gm, ids, positions, cache, self.signature)
            else:
                variant = lambda i, p, c, fn=gm, sig=self.signature: fn(*sig.variant_args(i, p, c))  # noqa: E731
            self._variants[key] = variant
        return variant

    def _generic_step(self, ids, actions, positions, cache):
        if self._generic is None:
            fn = self.sol.graph
            if self.mode == "compile":
                fn = torch.compile(fn, fullgraph=True, dynamic=False)
            elif self._eager_cpu:
                fn = _EagerCPU(fn)
            self._generic = fn
        return self._generic(*self.signature.args(ids, positions, actions, cache))

    def step(self, ids: Tensor, actions: Tensor, positions: Tensor, cache: StaticKVCache, *,
             action=_READ, kv_len: int | None = None):
        """ids/actions/positions [B, 1] -> (logits [B, 1, V], hidden [B, 1, d]).

        action: the one action every row runs, as the host knows it (an int), or None for a mixed
        step; when not given it is read from `actions` (a host sync). kv_len: max(positions) + 1 if
        the caller knows it (the ops then skip reading the positions)."""
        if action is _READ:
            first = actions.reshape(-1)[0]
            action = int(first) if bool((actions == first).all()) else None
        if self.mode == "cudagraph":
            kv_len = cache.max_len  # a replayed graph serves every step length: let the positions mask
        with step_hints(action_hints(self.sol.space, action, kv_len)):
            if action is None:
                return self._generic_step(ids, actions, positions, cache)
            return self._variant(int(action), ids, positions, cache)(ids, positions, cache)

    def prefill(self, ids: Tensor, positions: Tensor, cache: StaticKVCache, kv_len: int | None = None) -> Tensor:
        """A dense pass over T tokens (a prefill chunk), every row dense: fills the cache and returns the
        hidden states [B, T, d] (no logits: `hidden_only`)."""
        dense = torch.full_like(ids, self.sol.space.dense_index)
        if self._prefill is None:
            gm = hidden_only(self.sol.graph)
            self._prefill = _EagerCPU(gm) if self._eager_cpu else gm
        with step_hints(action_hints(self.sol.space, self.sol.space.dense_index, kv_len)):
            return self._prefill(*self.signature.args(ids, positions, dense, cache))[0]
