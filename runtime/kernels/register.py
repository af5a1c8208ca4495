"""The Triton kernels as the CUDA implementations of `solc::attention` and `solc::mlp`.

Imported at the end of `runtime.ops.library`, so every process that has the ops has these. CPU tensors
keep the reference implementation (the op's default); on CUDA the kernels run where they apply and the
reference runs otherwise:
  solc::attention  kernels for decode (T == 1) with q, caches and page statistics in one dtype among
                   float32/bfloat16/float16; prefill / teacher forcing (T > 1) and float64 -> reference.
  solc::mlp        kernels for <= 16 rows (decode batches) with x and every weight in one dtype among
                   float32/bfloat16/float16; more rows (prefill) and float64 -> reference.
                   quant="weight" rows at 8 / 4 bits: the low-bit kernels (`runtime.kernels.lowbit`) when
                   the step's hints give one level for every row (a dispatcher variant), else the
                   reference (mixed levels: the generic step, which is never captured).
The kernel paths never synchronise with the device while a CUDA graph is being captured (they read
positions, keep and bits on the device); outside a capture they read the largest keep level once per call
(one sync) to pick the autotune bucket. Set SOLC_TRITON=0 to run the reference on CUDA too.
Importing this module does not import triton (the kernel modules are imported on the first CUDA call).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch

from runtime.ops import library

_FLOATS = (torch.float32, torch.bfloat16, torch.float16)
MLP_MAX_ROWS = 16


def enabled() -> bool:
    return os.environ.get("SOLC_TRITON", "1") != "0"


def _reference(op):
    """The op's default (reference) implementation: the function it was defined with."""
    return op._init_fn


def attention_uses_kernel(q, k_cache, v_cache, page_min, page_max) -> bool:
    dtypes = {q.dtype, k_cache.dtype, v_cache.dtype, page_min.dtype, page_max.dtype}
    return (enabled() and q.shape[2] == 1 and len(dtypes) == 1 and q.dtype in _FLOATS
            and q.shape[-1] <= 256 and q.shape[1] % k_cache.shape[1] == 0)


def _mlp_site_fits(x, w_in, b_in, kind, act) -> bool:
    """What both MLP kernel families need: kernels on, a decode batch of rows, x in a kernel dtype, a
    known site kind and activation with its number of input weights and biases."""
    from runtime.ops.reference import ACTIVATIONS, MLP_KINDS

    rows = math.prod(x.shape[:-1])
    return (enabled() and 1 <= rows <= MLP_MAX_ROWS and x.dtype in _FLOATS and kind in MLP_KINDS
            and act in ACTIVATIONS and len(w_in) == (2 if kind == "gated" else 1) and len(b_in) == len(w_in))


def mlp_uses_kernel(x, w_in, b_in, w_out, b_out, kind, act) -> bool:
    tensors = [x, *w_in, *[b for b in b_in if b is not None], w_out, *([b_out] if b_out is not None else [])]
    return _mlp_site_fits(x, w_in, b_in, kind, act) and all(t.dtype == x.dtype for t in tensors)


def lowbit_uses_kernel(x, w_in, b_in, kind, act, packs, level) -> bool:
    from runtime.kernels.lowbit import has_copies

    return level in (4, 8) and _mlp_site_fits(x, w_in, b_in, kind, act) and has_copies(packs, level)


def _host_levels() -> tuple[Optional[int], Optional[bool]]:
    """(bit level, mlp keeps every channel) of every row as the step's hints promise them (None: unknown)."""
    from runtime.ops import step_hints

    hints = step_hints.current()
    if hints is None:
        return None, None
    return (None if hints.bits is None else int(hints.bits)), hints.mlp_dense


@library.attention.register_kernel("cuda")
def _attention_cuda(q, k, v, k_cache, v_cache, page_min, page_max, positions, keep, scale):
    if not attention_uses_kernel(q, k_cache, v_cache, page_min, page_max):
        return _reference(library.attention)(q, k, v, k_cache, v_cache, page_min, page_max, positions, keep, scale)
    from runtime.kernels._common import keep_bucket
    from runtime.kernels.attention import quest_decode_attention

    bucket = keep_bucket(keep, ("attn", tuple(k_cache.shape), q.shape[1], q.dtype))
    return quest_decode_attention(q, k_cache, v_cache, page_min, page_max, positions, keep, scale,
                                  k=k, v=v, bucket=bucket)


@library.mlp.register_kernel("cuda")
def _mlp_cuda(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size):
    level, mlp_dense = _host_levels()
    if quant == "weight" and not (level >= 16 if level is not None else bool((bits >= 16).all())):
        # A step of one known level (a dispatcher variant) runs the low-bit kernels; anything else runs the
        # reference (which takes that level from the hints too, so a CUDA-graph capture never reads `bits`).
        if lowbit_uses_kernel(x, w_in, b_in, kind, act, packs, level):
            from runtime.kernels.lowbit import lowbit_mlp

            return lowbit_mlp(x, keep, level, w_in, b_in, w_out, b_out, kind, act, packs, group_size,
                              prune=mlp_dense is not True)
        return _reference(library.mlp)(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size)
    if not mlp_uses_kernel(x, w_in, b_in, w_out, b_out, kind, act):
        return _reference(library.mlp)(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size)
    from runtime.kernels._common import keep_bucket
    from runtime.kernels.mlp import sparse_mlp

    bucket = keep_bucket(keep, ("mlp", tuple(w_in[0].shape), math.prod(x.shape[:-1]), x.dtype))
    return sparse_mlp(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, bucket=bucket)
