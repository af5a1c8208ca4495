"""Fused per-token fake quantization (`runtime.ops.reference.fake_quant`) as one Triton kernel.

One program per row: absmax over the row in float32, scale = max(absmax, 1e-8) / qmax with
qmax = 2^(b-1) - 1, q = rint(y / scale) (round half to even), clamp to +-qmax, y' = q * scale cast back
to y's dtype; rows with b >= 16 are copied unchanged. Bit-exact with the reference given the same y:
the divisions are IEEE (div_rn), rint is exact (|q| < 2^22 for b < 16), qmax is an exact power of two
minus one for integer b, and FMA contraction is disabled at launch.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from runtime.kernels._common import cast_rtne, next_pow2



@triton.jit
def _fake_quant_kernel(y_ptr, stride_ym, bits_ptr, out_ptr, stride_om, N, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    y_row = y_ptr + row.to(tl.int64) * stride_ym
    o_row = out_ptr + row.to(tl.int64) * stride_om
    b = tl.load(bits_ptr + row).to(tl.float64)
    offs = tl.arange(0, BLOCK_N)
    if b >= 16.0:
        for n0 in range(0, N, BLOCK_N):
            m = n0 + offs < N
            tl.store(o_row + n0 + offs, tl.load(y_row + n0 + offs, mask=m), mask=m)
    else:
        absmax = tl.zeros((), tl.float32)
        for n0 in range(0, N, BLOCK_N):
            m = n0 + offs < N
            yv = tl.load(y_row + n0 + offs, mask=m, other=0.0).to(tl.float32)
            absmax = tl.maximum(absmax, tl.max(tl.abs(yv), axis=0))
        b32 = b.to(tl.float32)
        e = (b32 - 1.0).to(tl.int32)
        pow2 = ((e + 127) << 23).to(tl.float32, bitcast=True)  # exact 2^(b-1) for integer b in [2, 128]
        is_int = e.to(tl.float32) == b32 - 1.0
        qmax = tl.where(is_int, pow2, tl.exp2(b32 - 1.0)) - 1.0
        scale = tl.math.div_rn(tl.maximum(absmax, 1e-8), qmax)
        for n0 in range(0, N, BLOCK_N):
            m = n0 + offs < N
            yraw = tl.load(y_row + n0 + offs, mask=m, other=0.0)
            q = tl.math.div_rn(yraw.to(tl.float32), scale)
            q = (q + 12582912.0) - 12582912.0
            q = tl.minimum(tl.maximum(q, -qmax), qmax)
            tl.store(o_row + n0 + offs, cast_rtne(q * scale, out_ptr.dtype.element_ty), mask=m)


def fake_quant_rows(y: Tensor, bits: Tensor, out: Tensor | None = None, block_n: int | None = None) -> Tensor:
    """`reference.fake_quant` of y [..., N] (fp32/bf16/fp16) with per-row bits [...] (any real dtype).

    out: optional preallocated output of y's shape (may be y itself: every element is read before it
    is written by the same program)."""
    if y.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"fake_quant_rows supports float32/bfloat16/float16, got {y.dtype}")
    N = y.shape[-1]
    y2 = y.reshape(-1, N)
    if y2.stride(-1) != 1:
        y2 = y2.contiguous()
    M = y2.shape[0]
    b = torch.broadcast_to(torch.as_tensor(bits, device=y.device), y.shape[:-1]).reshape(M)
    b = b.to(torch.float64).contiguous()
    o = torch.empty_like(y2) if out is None else out.view(M, N)
    if M == 0:
        return o.view(y.shape)
    block = block_n or min(4096, next_pow2(N))
    _fake_quant_kernel[(M,)](y2, y2.stride(0), b, o, o.stride(0), N, BLOCK_N=block,
                             num_warps=4 if block <= 2048 else 8, enable_fp_fusion=False)
    return o.view(y.shape)
