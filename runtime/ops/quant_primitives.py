"""Pure math of the weight-quantized MLP (quant="weight"): the storage formats of the int8 / int4 weight
copies and their dequantization, shared by the reference and the fast paths. No torchao here (the copies
are MADE with torchao's primitives in `runtime.torchao_adapter`; these functions only read them).

Formats (N output channels, K input channels):
  int8  q int8 [N, K], scale bf16 [N]:      w = q * scale                 (symmetric, per output channel)
  int4  q uint8 [N, K // 2] two nibbles per byte (low nibble = even k), values 0..15;
        scales_and_zeros bf16 [K // g, N, 2] (tinygemm layout):  w = (q - 8) * scale + zero, groups of g
        along K (asymmetric, groupwise; torchao's tinygemm convention, zero point in the float domain)
  int8 rows (row-skipping form of an int8 copy of W^T): uint8 [K, N + 8]: byte q + 128, then the row's
        float32 scale 1.0 and bias -128.0 (FBGEMM's byte-rowwise layout), so a row dequantizes to q exactly.
"""
from __future__ import annotations

import torch
from torch import Tensor

INT4_GROUP_SIZES = (128, 64, 32)  # preferred first
INT4_MID = 8  # (quant_max + quant_min + 1) / 2 for uint4 in 0..15
LOW_BITS = (4, 8)


def int4_group_size(in_dims) -> int:
    """The largest of 128 / 64 / 32 that divides every MLP in-dim (gate/up read d_model, down reads d_ffn)."""
    dims = sorted({int(d) for d in in_dims})
    for g in INT4_GROUP_SIZES:
        if all(d % g == 0 for d in dims):
            return g
    raise ValueError(
        f"MLP in-dims {dims}: no supported int4 group size divides them all (supported: "
        f"{list(INT4_GROUP_SIZES)}); drop the 4-bit level, e.g. levels={{'quant': [8, 16]}}"
    )


def to_bf16_grid(x: Tensor, dtype: torch.dtype) -> Tensor:
    """x rounded to bfloat16 (round to nearest even), returned in `dtype` (exact: bf16 embeds in fp32/64)."""
    return x.to(torch.bfloat16).to(dtype)


def pack_nibbles(q: Tensor) -> Tensor:
    """uint8 [N, K // 2] from integer values 0..15 [N, K]: low nibble = even k, high nibble = odd k."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: Tensor) -> Tensor:
    """int values [N, K] (uint8) from `pack_nibbles`' format."""
    return torch.stack([packed & 15, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def dequant_int8(q: Tensor, scale: Tensor, dtype: torch.dtype) -> Tensor:
    """w [N, K] = q * scale in `dtype` (exact in fp32: an int8 times a bf16 fits in 24 bits)."""
    return q.to(dtype) * scale.to(dtype)[:, None]


def dequant_int4(packed: Tensor, scales_and_zeros: Tensor, group_size: int, dtype: torch.dtype) -> Tensor:
    """w [N, K] = (q - 8) * scale + zero per group of `group_size` input channels, in `dtype`."""
    q = unpack_nibbles(packed)
    N, K = q.shape
    scale = scales_and_zeros[..., 0].t().to(dtype)  # [N, K // g]
    zero = scales_and_zeros[..., 1].t().to(dtype)
    w = (q.reshape(N, K // group_size, group_size).to(dtype) - INT4_MID) * scale[..., None] + zero[..., None]
    return w.reshape(N, K)


def int8_rows(q: Tensor) -> Tensor:
    """The byte-rowwise form of q^T (q int8 [N, K]): uint8 [K, N + 8] with per-row scale 1 and bias -128."""
    K = q.shape[1]
    body = (q.t().to(torch.int16) + 128).to(torch.uint8)
    scale_bias = torch.tensor([1.0, -128.0], dtype=torch.float32, device=q.device).expand(K, 2).contiguous()
    return torch.cat([body, scale_bias.view(torch.uint8)], dim=1).contiguous()


def int8_from_rows(rows: Tensor) -> Tensor:
    """q int8 [N, K] back from `int8_rows`' uint8 [K, N + 8] (the inverse, for checks)."""
    return (rows[:, :-8].to(torch.int16) - 128).to(torch.int8).t().contiguous()
