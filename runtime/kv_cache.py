"""solc's static KV cache: per layer, keys and values [B, Hkv, max_len, D] at absolute positions, and
the per-page key min/max [B, Hkv, pages, D] that Quest scores (kept current by solc::attention)."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from runtime import hugepages
from runtime.ops.reference import PAGE_SIZE

CACHE_PARTS = ("k_cache", "v_cache", "page_min", "page_max")  # per layer, in graph-input order


@dataclass(frozen=True)
class CacheSpec:
    """Shape of one attention layer's cache (what the attention pass found)."""

    n_kv_heads: int
    head_dim: int


class StaticKVCache:
    """Pre-allocated caches, written in place by solc::attention; never reallocated while decoding."""

    def __init__(self, specs: list[CacheSpec], batch: int, max_len: int, dtype: torch.dtype, device):
        if batch < 1 or max_len < 1:
            raise ValueError(f"StaticKVCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        self.batch, self.max_len = batch, max_len
        pages = -(-max_len // PAGE_SIZE)
        self.tensors: list[Tensor] = []
        for spec in specs:
            kv = (batch, spec.n_kv_heads, max_len, spec.head_dim)
            stats = (batch, spec.n_kv_heads, pages, spec.head_dim)
            self.tensors += [
                _filled(kv, 0.0, dtype, device),
                _filled(kv, 0.0, dtype, device),
                _filled(stats, float("inf"), dtype, device),
                _filled(stats, float("-inf"), dtype, device),
            ]

    @classmethod
    def of(cls, tensors: list[Tensor], max_len: int) -> "StaticKVCache":
        """A cache over existing tensors (CACHE_PARTS per layer, batch first), without allocating."""
        out = cls.__new__(cls)
        out.batch, out.max_len, out.tensors = tensors[0].shape[0], max_len, tensors
        return out

    def rows(self, a: int, b: int) -> "StaticKVCache":
        """Rows a..b-1 as a cache of their own: views, so what its ops write lands in this cache."""
        return self if (a, b) == (0, self.batch) else StaticKVCache.of([t[a:b] for t in self.tensors], self.max_len)

    def reset(self) -> None:
        for i, t in enumerate(self.tensors):
            t.fill_({2: float("inf"), 3: float("-inf")}.get(i % len(CACHE_PARTS), 0.0))


def _filled(shape: tuple[int, ...], value: float, dtype: torch.dtype, device) -> Tensor:
    """A cache tensor filled with value: on the CPU on huge pages where the OS allows (runtime/hugepages.py)."""
    if torch.device(device).type == "cpu":
        return hugepages.empty(shape, dtype).fill_(value)
    return torch.full(shape, value, dtype=dtype, device=device)


def repeat_rows(cache: StaticKVCache, repeats: int, out: StaticKVCache | None = None, length: int | None = None) -> StaticKVCache:
    """`cache`'s rows each repeated `repeats` times (row-major: r0,r0,..,r1,r1,..): K counterfactual
    schedules continue from one shared prefill. With `out` (a cache of batch * repeats rows, at least as
    long), the rows are copied into it in place, only the first `length` positions (default all) and
    their pages: what lies past them is never visible before a later step rewrites it."""
    if out is None:
        return StaticKVCache.of([t.repeat_interleave(repeats, dim=0) for t in cache.tensors], cache.max_len)
    length = cache.max_len if length is None else length
    if out.batch != cache.batch * repeats or out.max_len < length or length > cache.max_len:
        raise ValueError(f"repeat_rows(out=...) copies {length} positions of {cache.max_len} into {cache.batch * repeats} "
                         f"rows; got {out.batch} rows of {out.max_len}")
    pages = -(-length // PAGE_SIZE)
    for i, (src, dst) in enumerate(zip(cache.tensors, out.tensors)):
        n = length if i % len(CACHE_PARTS) < 2 else pages
        dst[:, :, :n].copy_(src[:, :, :n].repeat_interleave(repeats, dim=0))
    return out
