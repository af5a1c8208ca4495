"""Weight-only int8 / int4 MLP linears (quant="weight", bits 8 and 4) as Triton kernels for `solc::mlp`.

The definition is `runtime.ops.reference.lowbit_linear`: y = round_bf16(x_bf16 @ dequant(W)^T) with
float32 accumulation, then the bias. Each kernel program dequantizes its weight tile element by element
with the reference's own arithmetic (int8: q * scale; int4: (q - 8) * scale + zero, launched without
FMA contraction), so a weight reads as exactly the value the reference multiplies: the kernels differ
from the reference only by the order of the sum (and so, at worst, by one bf16 ulp of a rounded output).

Weight formats (`runtime.ops.quant_primitives`, the site's copies in `runtime.ops.mlp_weights`):
  FMT_INT8       int8 [N, K] + bf16 scale [N]: every input channel read (the down projection; gate/up when
                 the mlp axis keeps every channel or the site has no row form).
  FMT_INT4       nibble-packed uint8 [N, K / 2] + bf16 scales_and_zeros [K / g, N, 2]: every channel read.
                 There is no column-skipping int4 form: a pruned row runs this kernel on its zeroed input,
                 which is exact but saves no bytes (docs/kernels.md).
  FMT_INT8_ROWS  the byte-rowwise copy of W^T, uint8 [K, N + 8] (byte q + 128), over a list of channels:
                 the input projection of a pruned row reads only its kept channels' rows (TEAL's
                 column skipping on int8 weights). Rows of a group of up to 16 share the union list; a
                 row multiplies the channels it dropped by its own zeros, so the union never changes it.

Only decode batches (<= 16 rows) of a step whose bit level the host knows (a dispatcher variant: one
action on every row) run here; `runtime.kernels.register` sends everything else to the reference.
The bias, the activation and act(gate) * up run as the reference's own torch ops on the float32
pre-activations, so those parts are the reference's bits.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from runtime.kernels._common import cast_rtne, next_pow2
from runtime.ops import mlp_weights
from runtime.ops import reference as ref

FMT_INT8, FMT_INT4, FMT_INT8_ROWS = 0, 1, 2
MAX_ROWS = 16


@triton.jit
def _lowbit_linear_kernel(x_ptr, stride_xm, idx_ptr, len_ptr, q_ptr, stride_q, meta_ptr, y_ptr, stride_ym,
                          M, N, K, GROUP,
                          FMT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    if FMT == 2:
        L = tl.load(len_ptr + pid_m)  # the group's kept channels (union), listed first in idx
        scale = tl.load(meta_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    else:
        L = K
        if FMT == 0:
            scale = tl.load(meta_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    for k0 in range(0, L, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < L
        if FMT == 2:
            ch = tl.load(idx_ptr + pid_m.to(tl.int64) * K + kk, mask=k_ok, other=0)
        else:
            ch = kk
        xv = tl.load(x_rows + ch[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        xv = cast_rtne(xv.to(tl.float32), tl.bfloat16).to(tl.float32)  # [BM, BK]: x on the bf16 grid
        w_ok = n_ok[:, None] & k_ok[None, :]
        if FMT == 0:
            q = tl.load(q_ptr + n.to(tl.int64)[:, None] * stride_q + ch[None, :], mask=w_ok, other=0)
            w = q.to(tl.float32) * scale[:, None]  # [BN, BK]
        elif FMT == 1:
            byte = tl.load(q_ptr + n.to(tl.int64)[:, None] * stride_q + (ch >> 1)[None, :], mask=w_ok, other=0)
            nib = (byte.to(tl.int32) >> ((ch & 1) * 4)[None, :]) & 15  # low nibble = even channel
            sz = meta_ptr + ((ch // GROUP).to(tl.int64)[None, :] * N + n[:, None]) * 2
            s = tl.load(sz, mask=w_ok, other=0.0).to(tl.float32)
            z = tl.load(sz + 1, mask=w_ok, other=0.0).to(tl.float32)
            w = (nib.to(tl.float32) - 8.0) * s + z
        else:
            byte = tl.load(q_ptr + ch.to(tl.int64)[None, :] * stride_q + n[:, None], mask=w_ok, other=128)
            w = (byte.to(tl.float32) - 128.0) * scale[:, None]
        acc += tl.sum(xv[:, None, :] * w[None, :, :], axis=2)
    y = cast_rtne(acc, tl.bfloat16).to(tl.float32)
    tl.store(y_ptr + rows.to(tl.int64)[:, None] * stride_ym + n[None, :], y, mask=row_ok[:, None] & n_ok[None, :])


def _blocks(M: int) -> tuple[int, int, int]:
    block_m = next_pow2(M) if M <= 8 else 16
    block_n = 64 if block_m <= 4 else 32
    return block_m, block_n, max(8, min(64, 8192 // (block_m * block_n)))


def lowbit_linear(x2d: Tensor, fmt: int, q: Tensor, meta: Tensor, n_out: int, *, group_size: int = 0,
                  idx: Optional[Tensor] = None, lens: Optional[Tensor] = None,
                  blocks: Optional[tuple[int, int, int]] = None) -> Tensor:
    """round_bf16(x2d_bf16 @ dequant(W)^T) as float32 [M, n_out] (no bias). x2d [M, K] row-major.
    FMT_INT8_ROWS needs the channel lists of `runtime.kernels.mlp.select_channels` (idx, lens) made for
    groups of blocks[0] rows."""
    M, K = x2d.shape
    block_m, block_n, block_k = blocks or _blocks(M)
    if fmt == FMT_INT8_ROWS and (idx is None or lens is None):
        raise ValueError("FMT_INT8_ROWS reads a channel list: pass idx and lens")
    if fmt == FMT_INT4 and (group_size <= 0 or K % group_size or K % 2):
        raise ValueError(f"int4 weights need an even in-dim divisible by group_size, got K={K}, group_size={group_size}")
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    y = torch.empty(M, n_out, dtype=torch.float32, device=x2d.device)
    dummy = lens if lens is not None else y
    grid = (triton.cdiv(n_out, block_n), triton.cdiv(M, block_m))
    _lowbit_linear_kernel[grid](x2d, x2d.stride(0), idx if idx is not None else dummy, dummy, q, q.stride(0), meta,
                                y, y.stride(0), M, n_out, K, max(1, group_size),
                                FMT=fmt, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
                                enable_fp_fusion=False)
    return y


def has_copies(packs, bits: int) -> bool:
    table = mlp_weights.unpack(packs)
    names = ("in8", "in8_scale", "out8", "out8_scale") if bits == 8 else ("in4", "in4_sz", "out4", "out4_sz")
    return bits in (4, 8) and all(table[f] is not None for f in names)


def lowbit_mlp(x: Tensor, keep: Optional[Tensor], bits: int, w_in: list[Tensor], b_in: list[Optional[Tensor]],
               w_out: Tensor, b_out: Optional[Tensor], kind: str, act: str, packs, group_size: int, *,
               prune: bool = True) -> Tensor:
    """`reference.mlp` in weight mode for rows that all run at `bits` (4 or 8): the pruned input (exact
    channel selection, `runtime.kernels.mlp.select_channels`; prune=False when every row keeps every
    channel), then the low-bit input and down projections. x [..., d]; keep broadcasts to x's rows."""
    from runtime.kernels.mlp import select_channels

    table = mlp_weights.unpack(packs)
    lead, D = x.shape[:-1], x.shape[-1]
    M = math.prod(lead)
    if not 1 <= M <= MAX_ROWS:
        raise ValueError(f"lowbit_mlp runs 1..{MAX_ROWS} rows, got {M}")
    x2d = x.reshape(M, D)
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    blocks = _blocks(M)
    idx = lens = None
    if prune:
        keep1 = torch.broadcast_to(torch.as_tensor(keep, device=x.device), lead).reshape(M).to(torch.float64).contiguous()
        x2d, idx, lens = select_channels(x2d, keep1, blocks[0])
    if bits == 8:
        n_in = table["in8"].shape[0]
        if prune and table["in8_rows"] is not None:
            pre = lowbit_linear(x2d, FMT_INT8_ROWS, table["in8_rows"], table["in8_scale"], n_in, idx=idx, lens=lens,
                                blocks=blocks)
        else:
            pre = lowbit_linear(x2d, FMT_INT8, table["in8"], table["in8_scale"], n_in, blocks=blocks)
    else:
        n_in = table["in4"].shape[0]
        pre = lowbit_linear(x2d, FMT_INT4, table["in4"], table["in4_sz"], n_in, group_size=group_size, blocks=blocks)
    bias = ref._input_bias(b_in, w_in, kind)
    if bias is not None:
        pre = pre + bias.to(torch.float32)
    h = ref._hidden(pre, kind, ref._activation(act))
    if bits == 8:
        y = lowbit_linear(h, FMT_INT8, table["out8"], table["out8_scale"], table["out8"].shape[0], blocks=blocks)
    else:
        y = lowbit_linear(h, FMT_INT4, table["out4"], table["out4_sz"], table["out4"].shape[0],
                          group_size=group_size, blocks=blocks)
    if b_out is not None:
        y = y + b_out.to(torch.float32)
    return y.to(x.dtype).reshape(*lead, -1)
