"""Shared pieces of the Triton kernels: the in-kernel keep count, the keep-level bucket that autotune keys
include, and device facts the launch heuristics read."""
from __future__ import annotations

import math
import os
from functools import lru_cache

import torch
import triton
import triton.language as tl
from torch import Tensor

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# The CPU interpreter's tl.dot multiplies bfloat16 operands as their raw uint16 storage: under the
# interpreter, dots upcast their operands to float32 first (exact products, as the GPU's MMA gives).
_UPCAST_DOT = tl.constexpr(INTERPRET)


@triton.jit
def dot(a, b, acc, DOT_PRECISION: tl.constexpr):
    """tl.dot(a, b, acc) with float32 accumulation; DOT_PRECISION applies to float32 operands."""
    if _UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        return tl.dot(a, b, acc, input_precision=DOT_PRECISION)


@triton.jit
def keep_count(keep, n):
    """`runtime.ops.reference.keep_count` in-kernel, exactly: keep (float64 scalar) snapped to a 1e-6 grid
    (round half to even), ceil(snapped * n - 1e-9), clamped to [1, n]. n is an int64 scalar.

    Rounding: y + 2^52 - 2^52 is round-half-to-even for 0 <= y < 2^52 (keep is in (0, 1], y <= 1e6).
    Launch with enable_fp_fusion=False so keep * 1e6 + 2^52 and snapped * n - 1e-9 are not fused into
    FMAs (a fused FMA rounds once where torch rounds twice)."""
    y = keep * 1e6
    snapped = ((y + 4503599627370496.0) - 4503599627370496.0) / 1e6
    v = snapped * n.to(tl.float64) - 1e-9
    c = v.to(tl.int64)  # truncates toward zero: ceil for v < 0, floor for v >= 0
    c = tl.where(c.to(tl.float64) < v, c + 1, c)
    c = tl.maximum(c, 1)
    return tl.minimum(c, n)


@triton.jit
def cast_rtne(x, dtype: tl.constexpr):
    """float32 x cast to `dtype` rounding to nearest even, as torch's .to() does. bfloat16 rounds by
    integer arithmetic on the float32 bits, then casts an exactly representable value: the GPU's
    cast is already RTNE, but the CPU interpreter's float32 -> bfloat16 cast truncates (and its "rtne"
    mode rounds half up), so this keeps the interpreter tests meaningful at no cost on the GPU."""
    if dtype == tl.bfloat16:
        xf = x.to(tl.float32)
        bits = xf.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        return tl.where(xf != xf, xf, bits.to(tl.float32, bitcast=True)).to(tl.bfloat16)
    else:
        return x.to(dtype)


POISON_SCRATCH = False  # tests set it: float scratch buffers start as NaN, so a read of an unwritten slot shows


def scratch(shape, dtype: torch.dtype, device) -> Tensor:
    """An uninitialised scratch buffer (NaN-filled when POISON_SCRATCH is set)."""
    if POISON_SCRATCH and dtype.is_floating_point:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


# ---------------------------------------------------------------------------------------------------
# keep-level bucket (autotune key). Reading the level is a device sync, which a CUDA-graph capture
# forbids: while capturing, the bucket the same site saw on its last eager call is used (the dispatcher
# always runs a warm-up call of the same variant right before capturing it). The bucket only picks a
# tuned configuration, never a code path, so a stale bucket costs speed, not correctness.
# ---------------------------------------------------------------------------------------------------
N_BUCKETS = 5
_last_bucket: dict[tuple, int] = {}


def keep_bucket(keep: Tensor, site: tuple) -> int:
    """1..N_BUCKETS: ceil(max keep * N_BUCKETS) over the rows (the most work any row asks for)."""
    if keep.is_cuda and torch.cuda.is_current_stream_capturing():
        return _last_bucket.get(site, N_BUCKETS)
    value = float(keep.max())
    bucket = min(N_BUCKETS, max(1, math.ceil(value * N_BUCKETS - 1e-9)))
    _last_bucket[site] = bucket
    return bucket


@lru_cache(maxsize=None)
def sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(t: Tensor) -> int:
    """Streaming multiprocessors of t's device (a nominal 8 under the CPU interpreter)."""
    if t.is_cuda:
        return sm_count(t.device.index if t.device.index is not None else torch.cuda.current_device())
    return 8
