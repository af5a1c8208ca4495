"""The rotary embedding of a decode step in one C call (cpu_rotary.c), for the eager CPU program.

HF's models apply `x * cos + rotate_half(x) * sin` to q and k in every layer: seven aten ops each
(mul, slice, slice, neg, cat, mul, add), ~14 us of Python and dispatch per op pair on a SmolLM2 step.
`fuse(graph)` finds that pattern in a step graph (runtime/cpu_program.py runs it on the direct CPU
program only) and replaces it with `rotary(x, cos, sin)`, which computes the same products and sum per
element in fp32, so the same bits. Other shapes, dtypes or layouts (prefill, T > 1, fp64) run the same
seven ops in torch.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import Tensor

from runtime.ops import cpu_linear

_ATEN = torch.ops.aten
_F32 = torch.float32


def rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x * cos + cat(-x[..., h:], x[..., :h], -1) * sin (h = x.shape[-1] // 2), with the graph's
    roundings. x [B, H, T, D], cos/sin broadcastable [B or 1, 1, T, D]."""
    lib = cpu_linear._library or cpu_linear.library()
    if (lib is not None and x.dtype is _F32 and cos.dtype is _F32 and sin.dtype is _F32 and x.dim() == 4
            and x.shape[2] == 1 and x.stride(3) == 1 and x.shape[3] % 2 == 0 and cos.shape == sin.shape
            and cos.dim() == 4 and cos.shape[1:] == (1, 1, x.shape[3]) and cos.shape[0] in (1, x.shape[0])
            and cos.stride() == sin.stride() and cos.stride(3) == 1):
        B, H, _, D = x.shape
        out = torch.empty(B, H, 1, D, dtype=_F32)
        lib.solc_rotary_f32(x.data_ptr(), x.stride(0), x.stride(1), cos.data_ptr(), sin.data_ptr(),
                            cos.stride(0) if cos.shape[0] > 1 else 0, out.data_ptr(), out.stride(0), out.stride(1),
                            B, H, D)
        return out
    h = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., h:], x[..., :h]], -1) * sin


def fuse(graph: fx.Graph) -> int:
    """Replace every `add(mul(x, cos), mul(cat([neg(x[..., h:]), x[..., :h]], -1), sin))` (either operand
    order of the add and the muls) by one `rotary(x, cos, sin)` node; returns how many. The old nodes
    are left without users (dead-code elimination removes them)."""
    fused = 0
    for node in list(graph.nodes):
        match = _match(node)
        if match is None:
            continue
        with graph.inserting_before(node):
            new = graph.call_function(rotary, match)
        new.meta = dict(node.meta)
        node.replace_all_uses_with(new)
        graph.erase_node(node)
        fused += 1
    return fused


def _call(node, target) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target is target and not node.kwargs


def _last_dim(node: fx.Node, dim) -> bool:
    val = node.meta.get("val")
    return val is not None and isinstance(dim, int) and dim in (-1, val.dim() - 1)


def _match(node):
    """(x, cos, sin) when `node` is the rotary add, else None."""
    if not _call(node, _ATEN.add.Tensor) or len(node.args) != 2:
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if not (_call(plain, _ATEN.mul.Tensor) and _call(rotated, _ATEN.mul.Tensor)):
            continue
        for cat, sin in (rotated.args, rotated.args[::-1]):
            x = _rotate_half_of(cat)
            if x is None or not isinstance(sin, fx.Node):
                continue
            if plain.args[0] is x and isinstance(plain.args[1], fx.Node):
                cos = plain.args[1]
            elif plain.args[1] is x and isinstance(plain.args[0], fx.Node):
                cos = plain.args[0]
            else:
                continue
            if all(n.meta.get("val") is not None for n in (x, cos, sin)):
                return (x, cos, sin)
    return None


def _rotate_half_of(cat):
    """x when `cat` is cat([neg(slice(x, -1, h, end)), slice(x, -1, 0, h)], -1) with h = D / 2."""
    if not _call(cat, _ATEN.cat.default) or len(cat.args) != 2 or not isinstance(cat.args[0], (list, tuple)):
        return None
    parts = cat.args[0]
    if len(parts) != 2 or not _call(parts[0], _ATEN.neg.default):
        return None
    second, first = parts[0].args[0], parts[1]
    if not (_call(second, _ATEN.slice.Tensor) and _call(first, _ATEN.slice.Tensor)):
        return None
    x = first.args[0]
    if second.args[0] is not x or not isinstance(x, fx.Node) or x.meta.get("val") is None:
        return None
    D = x.meta["val"].shape[-1]
    if not isinstance(D, int) or D % 2:
        return None
    h = D // 2
    first_ok = tuple(first.args[1:4]) in ((-1, 0, h), (x.meta["val"].dim() - 1, 0, h)) and len(first.args) <= 4
    second_ok = (len(second.args) <= 4 and _last_dim(x, second.args[1]) and second.args[2] == h
                 and (len(second.args) < 4 or second.args[3] >= D))
    if not (first_ok and second_ok and _last_dim(cat, cat.args[1])):
        return None
    return x
