"""The `solc::` custom ops: the only ops the graph passes insert.

Each op is registered with `torch.library` (with a fake implementation for shape propagation) so
`torch.compile`, `torch.export` and AOTInductor treat it as one opaque node. The CPU implementation
is the reference math in `reference.py`; device kernels register themselves as implementations of the
same ops (issue: Triton kernels), so a pass never needs to know which backend runs.
"""
from __future__ import annotations

import os

import warnings
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.ops import cpu_attention, reference, step_hints


# The CPU implementation of each solc:: op as a plain function (op overload -> function), for the eager
# CPU decode step (runtime.dispatch.direct_cpu_calls). Calling an op through torch.library runs its
# autograd wrapper, a redispatch, the version-counter kernel and an aliasing check in Python, 50-90 us
# per call: with 6 ops per layer that was a sixth of a SmolLM2 decode step. The graph passes, export and
# torch.compile still see the ops; only an eager step that needs no autograd calls these directly.
CPU_IMPLS: dict = {}


def register_cpu(op, fn):
    """Register `fn` as op's CPU kernel and as its direct implementation (CPU_IMPLS)."""
    op.register_kernel("cpu")(fn)
    CPU_IMPLS[op._opoverload] = fn
    return fn


def cpu_fast_paths() -> bool:
    """Whether the CPU fast paths (cpu_attention, cpu_mlp, cpu_linear) run; SOLC_CPU_FAST=0 runs the
    reference on CPU, whose rows are not batch invariant (MKL's GEMV vs GEMM; see cpu_linear).
    They read their data-dependent sizes (kept pages, top-k ties) on the host, free on a CPU; the sync
    budget of the decode protocol is checked with them off, as on CUDA the kernels replace them."""
    return os.environ.get("SOLC_CPU_FAST", "1") != "0"


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> None:
    """Store the new keys/values [B, Hkv, T, D] at absolute `positions` [B, T] of each row."""
    index = positions[:, None, :, None].expand(k.shape[0], k.shape[1], k.shape[2], k.shape[3])
    k_cache.scatter_(2, index, k.to(k_cache.dtype))
    v_cache.scatter_(2, index, v.to(v_cache.dtype))


def causal_attention(q: Tensor, k: Tensor, v: Tensor, positions: Tensor, scale: float) -> Tensor:
    """SDPA where each query sees the keys at positions <= its own (what keep == 1 means)."""
    mask = torch.arange(k.shape[2], device=q.device) <= positions[:, None, :, None]  # [B, 1, T, S]
    return F.scaled_dot_product_attention(
        q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1]
    )


def attention_impl(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    page_min: Tensor,
    page_max: Tensor,
    positions: Tensor,
    keep: Tensor,
    scale: float,
) -> Tensor:
    """Append k/v to the static cache at `positions`, refresh the page metadata, then Quest attention.

    q [B, Hq, T, D]; k, v [B, Hkv, T, D] (un-repeated KV heads); caches [B, Hkv, S, D];
    page_min/page_max [B, Hkv, ceil(S / 8), D] per-page key statistics over each row's keys so far
    (what a decode kernel scores); positions [B, T] absolute positions of the new tokens, ascending
    within a row; keep [B, T] attention keep fraction.
    """
    hints = step_hints.current()
    if cpu_fast_paths() and cpu_attention.supports(q, k_cache, v_cache):  # a CPU decode step: read only what the action keeps
        keeps, rows_pos = cpu_attention.host_levels(keep, positions, hints)
        cpu_attention.write_step(k_cache, v_cache, page_min, page_max, k, v, rows_pos, positions)
        return cpu_attention.decode_attention(q, k_cache, v_cache, page_min, page_max, rows_pos, keeps, scale)
    write_kv(k_cache, v_cache, k, v, positions)
    decode = q.shape[2] == 1
    if decode:  # one new key per row: only its page's statistics change
        reference.refresh_current_page(page_min, page_max, k_cache, positions)
    else:
        low, high = reference.page_stats(k_cache, positions.amax(dim=1) + 1)
        page_min.copy_(low)
        page_max.copy_(high)
    # Keys past the furthest query are invisible to every query: do not score or read them.
    # A step's hints carry both facts as host numbers (no device sync); without them read the tensors.
    visible = hints.kv_len if hints is not None and hints.kv_len is not None else int(positions.max()) + 1
    dense = hints.attn_dense if hints is not None and hints.attn_dense is not None else bool((keep >= 1).all())
    k_vis, v_vis = k_cache[:, :, :visible], v_cache[:, :, :visible]
    if dense:  # dense: every visible page is kept, i.e. plain causal attention
        out = causal_attention(q, k_vis, v_vis, positions, scale)
    elif decode:  # score pages from the metadata, as a decode kernel does
        out = reference.quest_decode(q, k_vis, v_vis, page_min, page_max, positions, keep, scale)
    else:
        out = reference.quest_attention(q, k_vis, v_vis, positions, keep, scale)
    return out.contiguous()


attention = torch.library.custom_op("solc::attention", mutates_args=("k_cache", "v_cache", "page_min", "page_max"))(
    attention_impl)


@attention.register_fake
def _(q, k, v, k_cache, v_cache, page_min, page_max, positions, keep, scale):
    return q.new_empty(q.shape)  # contiguous, whatever q's strides (the real op returns contiguous)


def _bump_attention_versions(keyset, *args, **kwargs):
    """solc::attention's ADInplaceOrView kernel: bump the version counters of the four caches it writes,
    then run the backend. torch 2.13's generic kernel (custom_ops.adinplaceorview_impl) first rebinds
    the call against the schema (utils.fill_defaults rebuilds `schema.arguments` per argument): about
    50 us per call, as much as a short-context attention itself. The graph passes positional args, so
    here the written caches are args 3..6; any other call shape takes the generic rebinding."""
    if kwargs or len(args) != len(_ATTENTION_SCHEMA.arguments):
        all_args, _ = torch._library.utils.fill_defaults(_ATTENTION_SCHEMA, args, kwargs)
    else:
        all_args = args
    for i in _ATTENTION_MUTATED:
        torch.autograd.graph.increment_version(all_args[i])
    return attention._opoverload.redispatch(keyset & torch._C._after_ADInplaceOrView_keyset, *args, **kwargs)


CPU_IMPLS[attention._opoverload] = attention_impl  # its one implementation serves the CPU
_ATTENTION_SCHEMA = attention._opoverload._schema
_ATTENTION_MUTATED = tuple(i for i, a in enumerate(_ATTENTION_SCHEMA.arguments) if a.alias_info is not None
                           and a.alias_info.is_write)
assert [_ATTENTION_SCHEMA.arguments[i].name for i in _ATTENTION_MUTATED] == ["k_cache", "v_cache", "page_min", "page_max"]
_ATTENTION_VERSION_LIB = torch.library.Library("solc", "IMPL")  # noqa: TOR901  kept alive: owns the override
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=".*Overriding a previously registered kernel.*")
    warnings.filterwarnings("ignore", message="Warning only once for all operators")
    _ATTENTION_VERSION_LIB.impl("attention", _bump_attention_versions, "ADInplaceOrView", with_keyset=True)


@torch.library.custom_op("solc::mlp", mutates_args=())
def mlp(
    x: Tensor,
    keep: Tensor,
    bits: Tensor,
    w_in: list[Tensor],
    b_in: list[Optional[Tensor]],
    w_out: Tensor,
    b_out: Optional[Tensor],
    kind: str,
    act: str,
    quant: str,
    packs: list[Optional[Tensor]],
    group_size: int,
) -> Tensor:
    """A whole MLP site: prune the input to its top-|x| channels, then the MLP at the row's bit level
    (quant="weight": int8/int4 weight copies `packs`, see runtime.ops.mlp_weights; quant="activation":
    fake-quantize the output). `reference.mlp` is the definition."""
    keep, bits = dense_axes_skipped(keep, bits)
    return reference.mlp(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size).contiguous()


def dense_axes_skipped(keep: Tensor, bits: Tensor):
    """(keep, bits) with None for an axis on which every row is dense: the top-k sort and the quantizer
    are exact identities there. The step's hints say so without a device sync; else read the tensors."""
    hints = step_hints.current()
    keep_dense = hints.mlp_dense if hints is not None and hints.mlp_dense is not None else bool((keep >= 1).all())
    bits_dense = hints.bits_dense if hints is not None and hints.bits_dense is not None else bool((bits >= 16).all())
    if not bits_dense and hints is not None and hints.bits is not None:
        bits = int(hints.bits)  # one level for every row, known on the host
    return (None if keep_dense else keep), (None if bits_dense else bits)


@mlp.register_fake
def _(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size):
    return x.new_empty((*x.shape[:-1], w_out.shape[0]))


@torch.library.custom_op("solc::linear", mutates_args=())
def linear(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """F.linear whose rows do not depend on their batch mates on CPU (runtime.ops.cpu_linear); the
    graph's linears outside the MLP sites (attention projections, LM head) run through it."""
    return F.linear(x, weight, bias)


@linear.register_fake
def _(x, weight, bias):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


import runtime.ops.cpu_mlp  # noqa: E402,F401  the CPU fast paths of solc::mlp
import runtime.ops.cpu_linear  # noqa: E402,F401  the batch-invariant CPU solc::linear
import runtime.kernels.register  # noqa: E402,F401  CUDA implementations (Triton kernels)
