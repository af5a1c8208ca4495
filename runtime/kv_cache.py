"""solc's static KV cache: per layer, keys and values [B, Hkv, max_len, D] at absolute positions."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


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
        self.tensors: list[Tensor] = []
        for spec in specs:
            shape = (batch, spec.n_kv_heads, max_len, spec.head_dim)
            self.tensors += [torch.zeros(shape, dtype=dtype, device=device) for _ in range(2)]

    def reset(self) -> None:
        for t in self.tensors:
            t.zero_()
