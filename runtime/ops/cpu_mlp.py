"""The CPU implementation of `solc::mlp` for decode batches (1..16 rows): each row reads only what its
action keeps. `reference.mlp` is the definition; every path here equals it up to summation order.

Per row action (mlp keep k, bits b); rows sharing an action run together:
  k = 1, b = 16      F.linear, exactly the reference (the dense action pays for no selection)
  k < 1, b = 16      gate/up: F.embedding_bag over the rows of W_in^T (`wt`) at the row's kept channels,
                     weighted by their values: a row-skipping GEMV; down: F.linear
  b = 8, k = 1       torch._weight_int8pack_mm with bf16 activations, for gate/up and down
  b = 8, k < 1       gate/up: the quantized byte-rowwise embedding_bag over `in8_rows` (uint8 rows, row
                     scale 1 and bias -128, so a row is its int8 values exactly), per-output-channel
                     scale after the sum; down: _weight_int8pack_mm
  b = 4              torch._weight_int4pack_mm_for_cpu with bf16 activations on the pruned input (no
                     row-skipping int4 kernel exists on CPU: pruning saves nothing at 4 bits here)
  activation mode    the 16-bit paths above, then the reference fake quantizer
Every reduction of a row runs over that row alone in a fixed order (embedding_bag sums each bag on
its own; the int8/int4 kernels reduce each row alike whatever the row count), so in weight mode a row's
MLP output does not depend on its batch mates. Dense fp32 rows use F.linear, as the reference does.
Other inputs (more rows, float64, mismatched dtypes, missing copies) run the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.ops import library, mlp_weights, quant_primitives, reference, step_hints

MAX_ROWS = 16
DTYPES = (torch.float32, torch.bfloat16)


def kept_channels(x: Tensor, keep: float) -> Tensor:
    """[m, k] indices of each row's kept channels: the reference's top-|x| rule, ties to the lower index."""
    d = x.shape[-1]
    k = reference.keep_count(keep, d)
    a = x.abs()
    top = torch.topk(a, k, dim=-1)
    threshold = top.values[:, -1:]
    if bool(((a >= threshold).sum(dim=-1) == k).all()):  # no tie straddles the cut: topk's set is the set
        return top.indices
    return torch.sort(a, dim=-1, descending=True, stable=True).indices[:, :k]


def _bags(x: Tensor, idx: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    m, k = idx.shape
    flat = idx.reshape(-1)
    weights = x.gather(1, idx).reshape(-1)
    offsets = torch.arange(0, m * k, k, device=x.device)
    return flat, offsets, weights


def _add(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def _input_projection(x: Tensor, keep: float, bits: int, weight_mode: bool, w_in, b_in, kind, c, group_size) -> Tensor:
    """[m, N_in] pre-activations of rows x [m, d] (float32, bf16-rounded first at low bits)."""
    bias = reference._input_bias(b_in, w_in, kind)
    if not weight_mode or bits >= 16:
        flat, offsets, weights = _bags(x, kept_channels(x, keep))
        return _add(F.embedding_bag(flat, c["wt"], offsets, mode="sum", per_sample_weights=weights), bias)
    xb = x.to(torch.bfloat16)
    if bits == 8:
        if keep >= 1:
            return _add(torch._weight_int8pack_mm(xb, c["in8"], c["in8_scale"]).float(), bias)
        flat, offsets, weights = _bags(xb.float(), kept_channels(x, keep))
        y = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(
            c["in8_rows"], flat, offsets, False, 0, False, weights, None, False)
        return _add(quant_primitives.to_bf16_grid(y * c["in8_scale"].float(), torch.float32), bias)
    if keep < 1:
        xb = reference.prune_mlp_input(x, keep).to(torch.bfloat16)
    y = torch._weight_int4pack_mm_for_cpu(xb, c["in4_cpu"], group_size, c["in4_sz"])
    return _add(y.float(), bias)


def _down(h: Tensor, bits: int, weight_mode: bool, w_out, b_out, c, group_size) -> Tensor:
    if not weight_mode or bits >= 16:
        return F.linear(h, w_out, b_out)
    hb = h.to(torch.bfloat16)
    if bits == 8:
        y = torch._weight_int8pack_mm(hb, c["out8"], c["out8_scale"])
    else:
        y = torch._weight_int4pack_mm_for_cpu(hb, c["out4_cpu"], group_size, c["out4_sz"])
    return _add(y.float(), b_out)


def _needs(c: dict, keep: float, bits: int, weight_mode: bool) -> tuple[str, ...]:
    if weight_mode and bits == 8:
        return ("in8", "in8_scale", "out8", "out8_scale") + (("in8_rows",) if keep < 1 else ())
    if weight_mode and bits == 4:
        return ("in4_cpu", "in4_sz", "out4_cpu", "out4_sz")
    return ("wt",) if keep < 1 else ()


def applies(x: Tensor, w_in, b_in, w_out, b_out, quant: str) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    tensors = [*w_in, *[b for b in b_in if b is not None], w_out, *([b_out] if b_out is not None else [])]
    return 1 <= rows <= MAX_ROWS and x.dtype in DTYPES and all(t.dtype == x.dtype for t in tensors)


def _row_actions(keep: Tensor, bits: Tensor, lead) -> list[tuple[float, int]]:
    hints = step_hints.current()
    m = 1
    for s in lead:
        m *= s
    if hints is not None and hints.mlp is not None and hints.bits is not None:
        return [(float(hints.mlp), int(hints.bits))] * m
    ks = torch.broadcast_to(keep, lead).reshape(-1).tolist()
    bs = torch.broadcast_to(bits, lead).reshape(-1).tolist()
    return [(float(k), int(b)) for k, b in zip(ks, bs)]


def mlp_cpu(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size):
    if not applies(x, w_in, b_in, w_out, b_out, quant):
        return library.mlp._init_fn(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size)
    lead, d = x.shape[:-1], x.shape[-1]
    actions = _row_actions(keep, bits, lead)
    if all(k >= 1 and b >= 16 for k, b in actions):  # dense: no machinery at all
        return reference.mlp(x, None, None, w_in, b_in, w_out, b_out, kind, act).contiguous()
    c = mlp_weights.unpack(packs)
    weight_mode = quant == "weight"
    if any(c[name] is None for k, b in set(actions) for name in _needs(c, k, b, weight_mode)):
        return library.mlp._init_fn(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size)
    rows = x.reshape(-1, d)
    fn = reference._activation(act)
    out = None
    groups: dict[tuple[float, int], list[int]] = {}
    for i, a in enumerate(actions):
        groups.setdefault(a, []).append(i)
    for (k, b), members in groups.items():
        xs = rows if len(groups) == 1 else rows[members]
        if k >= 1 and (b >= 16 or not weight_mode):  # the dense MLP: the reference's own op sequence
            y = reference.mlp(xs, None, None, w_in, b_in, w_out, b_out, kind, act)
        else:
            low_bit = weight_mode and b < 16
            pre = _input_projection(xs.float() if low_bit else xs, k, b, weight_mode, w_in, b_in, kind, c, group_size)
            y = _down(reference._hidden(pre, kind, fn), b, weight_mode, w_out, b_out, c, group_size).to(x.dtype)
        if not weight_mode and b < 16:
            y = reference.fake_quant(y, torch.full(y.shape[:-1], b, device=y.device))
        if len(groups) == 1:
            return y.reshape(*lead, -1).contiguous()
        if out is None:
            out = y.new_empty(rows.shape[0], y.shape[-1])
        out[members] = y
    return out.reshape(*lead, -1)


library.mlp.register_kernel("cpu")(mlp_cpu)
