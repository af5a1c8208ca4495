"""CPU fast path of `solc::attention` for decode steps (one new token per row, any batch).

The reference (`reference.quest_decode`) scores every page, builds a key mask over the whole cache and
runs a masked softmax over all keys: it reads everything the action was meant to skip. This path reads
only what the action keeps:

  dense row (keep == 1, or every visible page kept)  plain SDPA over the row's visible keys: no sort, no
                                                     page scan, no mask
  sparse row, gather form   score the pages from the metadata (two matmuls per row, all KV heads at
                            once), top-k pages per query head, copy only the kept pages' K and V (a page
                            of 8 tokens is one contiguous block of each KV head in the [B, Hkv, S, D]
                            cache) into preallocated buffers, attend over them
  sparse row, masked form   where a query head's kept pages are so many that copying them costs more than
                            reading the whole visible cache once per KV head (GQA: G query heads pick
                            their own pages), the exact dense-masked form: scores, then one masked
                            softmax over the visible keys

Both sparse forms keep the reference's pages (tie rule: every page scoring >= the k-th best is kept), so
the result is the reference's up to float rounding (tests/runtime/ops/test_cpu_attention.py).

Batch invariance (DESIGN invariant 6): every row is computed with shapes that depend on that row alone
(its own visible length, its own kept pages), so a row's output is the same bits alone or in any batch.
Dense rows too run one SDPA call each: a batched SDPA call gives some rows other bits than the same row
alone (torch 2.13's CPU flash kernel; checked by the tests).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.ops.reference import PAGE_SIZE
from runtime.ops.step_hints import StepHints

# A sparse row copies G * k pages per KV head (each query head its own pages); the masked form reads the
# row's n visible pages once per KV head and masks. Copy-and-attend costs about this many times a
# streamed read per page (measured on the development CPU, SmolLM2 shapes: the crossover sits near
# G * k = 0.6 n), so the gather form runs while G * k * GATHER_COST < n.
GATHER_COST = 1.6
# Up to this many rows, the new key/value and its page statistics are written with per-row slices (a
# handful of ops per row); above it, with the reference's batched scatter/gather (a fixed dozen ops).
SLICE_WRITE_MAX_ROWS = 2


class _Buffers:
    """Preallocated, grow-only scratch tensors keyed by (name, dtype): allocating the gathered K/V
    (megabytes at long context) on every call costs more than the attention itself."""

    def __init__(self):
        self._store: dict[tuple[str, torch.dtype], Tensor] = {}

    def get(self, name: str, numel: int, dtype: torch.dtype) -> Tensor:
        buf = self._store.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = torch.empty(max(numel, 2 * (buf.numel() if buf is not None else 0)), dtype=dtype)
            self._store[(name, dtype)] = buf
        return buf[:numel]


_BUFFERS = _Buffers()


def supports(q: Tensor, k_cache: Tensor) -> bool:
    """Whether this path handles the call: CPU, one query per row, a contiguous cache of >= 1 page."""
    return (
        q.device.type == "cpu"
        and q.shape[2] == 1
        and k_cache.is_contiguous()
        and k_cache.shape[2] >= PAGE_SIZE
        and q.dtype in (torch.float32, torch.float64, torch.bfloat16)
    )


def write_and_refresh(k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor, k: Tensor, v: Tensor,
                      positions: list[int], page_size: int = PAGE_SIZE) -> None:
    """Store one new key/value per row at its position and recompute the statistics of the page that
    holds it over that page's keys <= the position (what `write_kv` + `refresh_current_page` do, with
    host positions: slices instead of index tensors)."""
    for b, p in enumerate(positions):
        k_cache[b, :, p].copy_(k[b, :, 0])
        v_cache[b, :, p].copy_(v[b, :, 0])
        start = p - p % page_size
        low, high = torch.aminmax(k_cache[b, :, start:p + 1], dim=1)
        page_min[b, :, p // page_size].copy_(low)
        page_max[b, :, p // page_size].copy_(high)


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor,
                     positions: list[int], keeps: list[float], scale: float) -> Tensor:
    """Attention of each row's one query q [B, Hq, 1, D] (at host `positions`, keep fractions `keeps`)
    over its cache row; the cache and page statistics already hold the row's keys <= its position."""
    B = q.shape[0]
    if B == 1 and _kept_page_count(positions[0], keeps[0]) is None:
        return _dense(q, k_cache[:, :, :positions[0] + 1], v_cache[:, :, :positions[0] + 1], scale)
    out = torch.empty_like(q)
    for b, (p, keep) in enumerate(zip(positions, keeps)):
        k_pages = _kept_page_count(p, keep)
        if k_pages is None:
            # One SDPA call per row even where rows share a length: a batched call computes some rows
            # with other bits than the same row alone (torch 2.13's CPU flash kernel).
            out[b] = _dense(q[b:b + 1], k_cache[b:b + 1, :, :p + 1], v_cache[b:b + 1, :, :p + 1], scale)[0]
        else:
            out[b] = _sparse_row(q[b], k_cache, v_cache, page_min, page_max, b, p, k_pages, scale)
    return out


def _kept_page_count(p: int, keep: float) -> Optional[int]:
    """Pages a query at position p keeps (the reference's min(ceil(budget / 8), visible pages)), or None
    where that is every visible page: then the action is exactly causal attention."""
    n_visible = p // PAGE_SIZE + 1
    if keep >= 1:
        return None
    k_pages = -(-keep_count_host(keep, p + 1) // PAGE_SIZE)
    return k_pages if k_pages < n_visible else None


def keep_count_host(keep: float, n: int) -> int:
    """`reference.keep_count` on host numbers, the same float64 arithmetic without building tensors
    (Python floats are IEEE doubles and round() rounds half to even, as torch.round does)."""
    snapped = round(keep * 1e6) / 1e6
    return min(max(math.ceil(snapped * n - 1e-9), 1), n)


def _dense(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """SDPA of the newest query over all its visible keys: no mask needed (every key is <= the query)."""
    return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _kept_pages(q_rows: Tensor, low: Tensor, high: Tensor, k_pages: int) -> tuple[Tensor, Tensor, Tensor]:
    """Page scores of one row (q_rows [Hkv, G, D] against its visible pages' statistics [Hkv, n, D]) and
    the reference's kept set: (scores [Hkv, G, n], top page indices [Hkv, G, m], k-th score [Hkv, G, 1])
    where m >= k_pages is the most pages any query head keeps (ties at the k-th score keep them all)."""
    scores = torch.baddbmm(q_rows.clamp(max=0) @ low.transpose(-1, -2), q_rows.clamp(min=0), high.transpose(-1, -2))
    values, index = torch.topk(scores, k_pages, dim=-1, sorted=True)
    kth = values[..., -1:]
    most = int((scores >= kth).sum(-1).max())
    if most > k_pages:  # a tie at the threshold: the reference keeps every tied page
        values, index = torch.topk(scores, most, dim=-1, sorted=True)
    return scores, index, kth


def _sparse_row(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor, b: int, p: int,
                k_pages: int, scale: float) -> Tensor:
    """Quest attention of row b's query q [Hq, 1, D] at position p keeping k_pages (< visible) pages."""
    Hq, _, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    n = p // PAGE_SIZE + 1
    cdt = _compute_dtype(q)
    q_rows = q.reshape(Hkv, G, D).to(cdt)
    low = page_min[b, :, :n].to(cdt)
    high = page_max[b, :, :n].to(cdt)
    scores, index, kth = _kept_pages(q_rows, low, high, k_pages)
    m = index.shape[-1]
    if G * m * GATHER_COST < n:
        return _gather_form(q_rows, k_cache, v_cache, b, p, index, scores, kth, scale).reshape(Hq, 1, D).to(q.dtype)
    return _masked_form(q_rows, k_cache, v_cache, b, p, scores >= kth, scale).reshape(Hq, 1, D).to(q.dtype)


def _gather_form(q_rows: Tensor, k_cache: Tensor, v_cache: Tensor, b: int, p: int, index: Tensor, scores: Tensor,
                 kth: Tensor, scale: float) -> Tensor:
    """Copy each query head's kept pages of K and V (m pages of 8 tokens) and attend over them."""
    Hkv, G, D = q_rows.shape
    S = k_cache.shape[2]
    m = index.shape[-1]
    ps = PAGE_SIZE
    # Pages in ascending order: the softmax then sums in the reference's key order.
    index = index.sort(dim=-1).values
    page_start = index * ps
    # A page's 8 tokens are one contiguous block of its KV head; over an overlapping view whose row r is
    # tokens r..r+7 of the flattened cache, page j of head h of row b is row (b*Hkv + h)*S + 8j. The last
    # page of a cache whose length is not a multiple of 8 starts at S-8 instead (never past the row's end),
    # and the tokens it then holds of the page before are masked below.
    block_start = page_start.clamp(max=S - ps)
    heads = torch.arange(Hkv)[:, None, None]
    rows = ((b * Hkv + heads) * S + block_start).reshape(-1)  # [Hkv*G*m]
    flat = k_cache.shape[0] * Hkv * S
    k_blocks = k_cache.as_strided((flat - ps + 1, ps * D), (D, 1))
    v_blocks = v_cache.as_strided((flat - ps + 1, ps * D), (D, 1))
    n_rows = rows.numel()
    k_kept = torch.index_select(k_blocks, 0, rows, out=_BUFFERS.get("k", n_rows * ps * D, k_cache.dtype).view(n_rows, ps * D))
    v_kept = torch.index_select(v_blocks, 0, rows, out=_BUFFERS.get("v", n_rows * ps * D, v_cache.dtype).view(n_rows, ps * D))
    cdt = q_rows.dtype
    k_kept = k_kept.view(Hkv * G, m * ps, D).to(cdt)
    v_kept = v_kept.view(Hkv * G, m * ps, D).to(cdt)
    logits = torch.bmm(q_rows.reshape(Hkv * G, 1, D), k_kept.transpose(1, 2)).view(Hkv, G, m, ps)
    key_pos = block_start[..., None] + torch.arange(ps)  # [Hkv, G, m, ps]
    invalid = (key_pos > p) | (key_pos < page_start[..., None])
    # Heads that keep fewer than m pages (m > k only on ties) drop their extra pages: those score < kth.
    if m > 0:
        invalid |= (torch.gather(scores, -1, index) < kth)[..., None]
    logits = logits.mul_(scale).masked_fill_(invalid, float("-inf"))
    probs = torch.softmax(logits.view(Hkv * G, 1, m * ps), dim=-1)
    return torch.bmm(probs, v_kept)  # [Hkv*G, 1, D]


def _masked_form(q_rows: Tensor, k_cache: Tensor, v_cache: Tensor, b: int, p: int, kept: Tensor,
                 scale: float) -> Tensor:
    """One softmax over the row's visible keys with the unkept pages masked (kept [Hkv, G, n])."""
    Hkv, G, D = q_rows.shape
    length = p + 1
    n = kept.shape[-1]
    k = k_cache[b, :, :length].to(q_rows.dtype)
    v = v_cache[b, :, :length].to(q_rows.dtype)
    logits = (q_rows @ k.transpose(-1, -2)).mul_(scale)  # [Hkv, G, length]
    key_kept = kept[..., None].expand(Hkv, G, n, PAGE_SIZE).reshape(Hkv, G, n * PAGE_SIZE)[..., :length]
    probs = torch.softmax(logits.masked_fill_(~key_kept, float("-inf")), dim=-1)
    return probs @ v  # [Hkv, G, D]


def host_levels(keep: Tensor, positions: Tensor, hints: Optional[StepHints]) -> tuple[list[float], list[int]]:
    """Each row's keep fraction and position as host numbers: from the step's hints where they are
    known (a uniform action; batch 1 at a known kv_len), else read from the tensors (cheap on CPU)."""
    B = positions.shape[0]
    if hints is not None and hints.attn is not None:
        keeps = [float(hints.attn)] * B
    else:
        keeps = keep[:, 0].tolist()
    if B == 1 and hints is not None and hints.kv_len is not None:
        pos = [hints.kv_len - 1]
    else:
        pos = positions[:, 0].tolist()
    return keeps, pos
