"""The eager CPU decode program: a copy of a step graph rewritten to run with as little Python as possible.

A SmolLM2 decode step on CPU is ~40 ms of weight streaming plus ~1200 small aten ops called one by one
from the generated Python code; every action pays for the second part alike, so it is what keeps a
cheap action's step close to the dense one. Each rewrite below keeps the graph's arithmetic exactly
(the same kernels on the same values, so the same bits: tests/runtime/test_cpu_program.py):

  direct solc calls     solc:: nodes call the ops' CPU implementations (`library.CPU_IMPLS`), without
                        torch.library's Python machinery (autograd wrapper, redispatch, version bumps,
                        aliasing check: 50-90 us a call)
  dropped checks/casts  export's `_assert_tensor_metadata` and casts to the dtype a value already has
  python bindings       `torch.ops.aten.mul.Tensor(a, b)` -> `torch.mul(a, b)`: the same aten kernel
                        through the C-bound function, without OpOverload's Python `__call__` frame
                        (a view: 3.6 -> 1.7 us); slices of a static extent become `narrow`
  shared views          identical view nodes of one value (each layer's unsqueeze of the rotary
                        cos/sin) are computed once
  fused rotary          `x * cos + rotate_half(x) * sin` (seven ops for q and seven for k in every layer
                        of the HF models) is one C call that does the same fp32 multiplies and add per
                        element (runtime/ops/cpu_rotary.c)
  attention blocks      in llama-style layers, the RMSNorm after its mean, q/k/v, rotary, cache write,
                        attention, o_proj and residual add are one C call (runtime/ops/cpu_block.c) that
                        runs the same kernels on the same values; other calls run the matched nodes;
                        so are the MLP blocks (cpu_block.py)
  block chains          the step's run of blocks, layer after layer, is one C call over descriptors
                        planned once (runtime/ops/cpu_chain.py); mixed rows run the blocks one by one
  flat attributes       weights under flat names (one attribute lookup in place of six per weight)

Only for steps without autograd (every decode path runs under no_grad): the ops' wrappers are what
autograd needs. The model's own graph keeps its ops (export, torch.compile and CUDA see them).
"""
from __future__ import annotations

import copy

import torch
import torch.fx as fx

from runtime.ops import cpu_block, cpu_chain, cpu_rotary, library

_ATEN = torch.ops.aten

# aten overload -> the torch function that reaches the same kernel with the same positional arguments.
# Only nodes without kwargs are rewritten (every one of these takes its arguments positionally here).
PYTHON_BINDINGS = {
    _ATEN.mul.Tensor: torch.mul,
    _ATEN.add.Tensor: torch.add,
    _ATEN.sub.Tensor: torch.sub,
    _ATEN.neg.default: torch.neg,
    _ATEN.rsqrt.default: torch.rsqrt,
    _ATEN.pow.Tensor_Scalar: torch.pow,
    _ATEN.mean.dim: torch.mean,
    _ATEN.cat.default: torch.cat,
    _ATEN.view.default: torch.Tensor.view,
    _ATEN.reshape.default: torch.reshape,
    _ATEN.transpose.int: torch.transpose,
    _ATEN.unsqueeze.default: torch.unsqueeze,
    _ATEN.select.int: torch.select,
    _ATEN.silu.default: torch.nn.functional.silu,
}
# Pure view ops: two nodes with the same target and arguments give the same view of the same storage.
_VIEWS = {_ATEN.unsqueeze.default, _ATEN.view.default, _ATEN.transpose.int, _ATEN.slice.Tensor,
          _ATEN.expand.default, _ATEN.select.int, _ATEN.reshape.default}


def direct_cpu_calls(gm: fx.GraphModule, *, fuse: bool = True, blocks: bool = True,
                     chain: bool = True) -> fx.GraphModule:
    """A copy of `gm` (sharing its weights) rewritten as the module doc says; fuse=False keeps only the
    direct solc calls, the dropped checks/casts and the flat attributes, blocks=False all but the fused
    attention/MLP blocks, chain=False all but the block chains (benchmarks/cpu_program_ab.py measures
    each against the others)."""
    graph = copy.deepcopy(gm.graph)
    casts_known = _dtypes_as_traced(gm)
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target in library.CPU_IMPLS:
            node.target = library.CPU_IMPLS[node.target]
        elif node.target is _ATEN._assert_tensor_metadata.default:
            graph.erase_node(node)  # export's shape/dtype checks: a compiled program drops them too
        elif casts_known and node.target is _ATEN.to.dtype and not node.kwargs and _dtype(node.args[0]) == node.args[1]:
            node.replace_all_uses_with(node.args[0])  # a cast to the dtype the value has: x.to() returns x
            graph.erase_node(node)
    if fuse:
        _share_views(graph)
        cpu_rotary.fuse(graph)
        graph.eliminate_dead_code(is_impure_node=_impure)  # the fused rotaries' old nodes
        if blocks:
            cpu_block.fuse(graph)  # matches single-use chains: after the dead users are gone
            if chain:
                cpu_chain.fuse(graph)
        _python_bindings(graph)
    graph.lint()
    program = fx.GraphModule(_flat_attributes(gm, graph), graph, class_name=type(gm).__name__ + "DirectCPU")
    _plain_attributes(program)
    return program


def _impure(node: fx.Node) -> bool:
    """What dead-code elimination keeps without users: every call but the functional aten ops (the
    fused rotaries' old nodes, export's unused mask arithmetic) and the fused rotary itself; the
    direct solc calls stay (they write their caches)."""
    if node.op != "call_function":
        return node.op != "get_attr"  # inputs, outputs and export's guard module stay
    if node.target is cpu_rotary.rotary:
        return False
    return not isinstance(node.target, torch._ops.OpOverload) or node.is_impure()


def _share_views(graph: fx.Graph) -> None:
    """Identical view nodes (same target, same arguments) computed once."""
    seen: dict = {}
    for node in list(graph.nodes):
        if node.op != "call_function" or node.target not in _VIEWS or node.kwargs:
            continue
        try:
            key = (node.target, _hashable(node.args))
        except TypeError:
            continue
        if key in seen:
            node.replace_all_uses_with(seen[key])
            graph.erase_node(node)
        else:
            seen[key] = node


def _hashable(value):
    if isinstance(value, (list, tuple)):
        return tuple(_hashable(v) for v in value)
    hash(value)
    return value


def _python_bindings(graph: fx.Graph) -> None:
    for node in graph.nodes:
        if node.op != "call_function" or node.kwargs:
            continue
        if node.target in PYTHON_BINDINGS:
            node.target = PYTHON_BINDINGS[node.target]
        elif node.target is _ATEN.slice.Tensor:
            _slice_to_narrow(node)


def _slice_to_narrow(node: fx.Node) -> None:
    """aten.slice(x, dim, start, end) -> x.narrow(dim, start, length) where x's extent along dim is a
    known int (the head dim of q/k, say), the step 1 and the bounds in range: the same view."""
    x, dim, start, end, step = (list(node.args) + [0, None, None, 1][len(node.args) - 1:])[:5]
    val = x.meta.get("val") if isinstance(x, fx.Node) else None
    if val is None or not isinstance(dim, int) or step != 1 or not isinstance(start, int):
        return
    size = val.shape[dim]
    if not isinstance(size, int):
        return
    end = size if end is None else min(end, size)
    if not 0 <= start <= end:
        return
    node.target, node.args = torch.narrow, (x, dim, start, end - start)


def _flat_attributes(gm: fx.GraphModule, graph: fx.Graph):
    """A flat root for `graph`'s attributes (`_attr_<i>`, the same tensors, not copies) when every get_attr
    is a tensor: the exported code reads `getattr(self.model.model.layers, "0").self_attn.q_proj.weight`,
    six Module.__getattr__ calls per weight and step (2 ms of a SmolLM2 step), a flat name one."""
    nodes = [n for n in graph.nodes if n.op == "get_attr"]
    values = [attribute(gm, n.target) for n in nodes]
    if not all(isinstance(v, torch.Tensor) for v in values):
        return gm
    root = {n.target: gm.get_submodule(n.target) for n in graph.nodes if n.op == "call_module"}  # export's guards
    for i, (node, value) in enumerate(zip(nodes, values)):
        node.target = f"_attr_{i}"
        root[node.target] = value
    return root


def _plain_attributes(program: fx.GraphModule) -> None:
    """The flat weights as plain instance attributes, not registered parameters or buffers: the generated
    code then reads each with one dict lookup instead of a Module.__getattr__ call (~600 a SmolLM2 step,
    ~0.5 ms cold). The program shares the tensors with the graph it was made from, which owns them."""
    for store in (program._parameters, program._buffers):
        for name in [n for n in store if n.startswith("_attr_")]:
            object.__setattr__(program, name, store.pop(name))


def attribute(gm: fx.GraphModule, target: str):
    """The value a get_attr node's dotted target names on gm (None where a part is missing)."""
    value = gm
    for part in target.split("."):
        value = getattr(value, part, None)
    return value


def _dtype(node):
    val = node.meta.get("val") if isinstance(node, fx.Node) else None
    return getattr(val, "dtype", None)


def _dtypes_as_traced(gm: fx.GraphModule) -> bool:
    """Whether the weights still have the dtypes they were traced with (the node metadata is current)."""
    for node in gm.graph.nodes:
        if node.op == "get_attr" and _dtype(node) is not None:
            value = attribute(gm, node.target)
            if isinstance(value, torch.Tensor) and value.dtype != _dtype(node):
                return False
    return True

