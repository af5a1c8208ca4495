"""The `solc::` custom ops: the only ops the graph passes insert.

Each op is registered with `torch.library` (with a fake implementation for shape propagation) so
`torch.compile`, `torch.export` and AOTInductor treat it as one opaque node. The CPU implementation
is the reference math in `reference.py`; device kernels register themselves as implementations of the
same ops (issue: Triton kernels), so a pass never needs to know which backend runs.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from runtime.ops import reference


def write_kv(k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, positions: Tensor) -> None:
    """Store the new keys/values [B, Hkv, T, D] at absolute `positions` [B, T] of each row."""
    index = positions[:, None, :, None].expand(k.shape[0], k.shape[1], k.shape[2], k.shape[3])
    k_cache.scatter_(2, index, k.to(k_cache.dtype))
    v_cache.scatter_(2, index, v.to(v_cache.dtype))


@torch.library.custom_op("solc::attention", mutates_args=("k_cache", "v_cache", "page_min", "page_max"))
def attention(
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
    write_kv(k_cache, v_cache, k, v, positions)
    lengths = positions.amax(dim=1) + 1
    low, high = reference.page_stats(k_cache, lengths)
    page_min.copy_(low)
    page_max.copy_(high)
    # Keys past the furthest query are invisible to every query: do not score or read them.
    visible = int(lengths.max())
    return reference.quest_attention(
        q, k_cache[:, :, :visible], v_cache[:, :, :visible], positions, keep, scale
    )


@attention.register_fake
def _(q, k, v, k_cache, v_cache, page_min, page_max, positions, keep, scale):
    return torch.empty_like(q)


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
) -> Tensor:
    """A whole MLP site: prune the input to its top-|x| channels, MLP, fake-quantize the output."""
    return reference.mlp(x, keep, bits, w_in, b_in, w_out, b_out, kind, act)


@mlp.register_fake
def _(x, keep, bits, w_in, b_in, w_out, b_out, kind, act):
    return x.new_empty((*x.shape[:-1], w_out.shape[0]))
