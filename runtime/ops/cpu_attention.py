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


def supports(q: Tensor, k_cache: Tensor, v_cache: Tensor) -> bool:
    """Whether this path handles the call: CPU, one query per row, a contiguous cache of >= 1 page."""
    return (
        q.device.type == "cpu"
        and q.shape[2] == 1
        and k_cache.is_contiguous()
        and v_cache.is_contiguous()
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
    """Attention of the newest query of one row (q [1, Hq, 1, D]) over all its visible keys k, v
    [1, Hkv, L, D]: no mask needed (every key is <= the query). The G query heads of a KV head share one
    matmul: on this CPU a [G, D] @ [D, L] product per KV head runs 1.2x (short context) to 2x (16k)
    faster than SDPA's flash kernel for one query. bfloat16 keeps SDPA (the reference's precision)."""
    if q.dtype == torch.bfloat16:
        return F.scaled_dot_product_attention(q, k, v, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    _, Hq, _, D = q.shape
    Hkv = k.shape[1]
    q_rows = q.reshape(Hkv, Hq // Hkv, D)
    logits = torch.bmm(q_rows, k[0].transpose(1, 2)).mul_(scale)
    return torch.bmm(torch.softmax(logits, dim=-1), v[0]).view(1, Hq, 1, D)


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


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
    # max(q*M, q*m) == q+ * M + q- * m (M >= m): the reference's page score as two matmuls per KV head
    scores = torch.baddbmm(q_rows.clamp(max=0) @ low.transpose(-1, -2), q_rows.clamp(min=0), high.transpose(-1, -2))
    # The reference keeps every page scoring >= the k-th best (ties at the threshold keep more than k).
    kth = torch.kthvalue(scores, n - k_pages + 1, dim=-1, keepdim=True).values
    kept = scores >= kth  # [Hkv, G, n]
    n_kept = int(kept.sum())
    if n_kept == Hq * k_pages:  # no tie: every query head keeps exactly k_pages
        if G * k_pages * GATHER_COST >= n:
            return _masked_form(q_rows, k_cache, v_cache, b, p, kept, scale).reshape(Hq, 1, D).to(q.dtype)
        index = kept.nonzero()[:, -1].view(Hkv, G, k_pages)  # ascending page order per head
        return _gather_form(q_rows, k_cache, v_cache, b, p, index, None, scale).reshape(Hq, 1, D).to(q.dtype)
    # A tie: every head copies the most pages any head keeps, and masks the ones it does not keep.
    most = int(kept.sum(-1).max())
    if G * most * GATHER_COST >= n:
        return _masked_form(q_rows, k_cache, v_cache, b, p, kept, scale).reshape(Hq, 1, D).to(q.dtype)
    index = torch.topk(scores, most, dim=-1).indices.sort(dim=-1).values
    dropped = ~torch.gather(kept, -1, index)
    return _gather_form(q_rows, k_cache, v_cache, b, p, index, dropped, scale).reshape(Hq, 1, D).to(q.dtype)


def _gather_form(q_rows: Tensor, k_cache: Tensor, v_cache: Tensor, b: int, p: int, index: Tensor,
                 dropped: Optional[Tensor], scale: float) -> Tensor:
    """Attend over each query head's kept pages only (index [Hkv, G, m], ascending, so the softmax sums
    in the reference's key order); `dropped` [Hkv, G, m] marks pages a head copies but does not keep
    (ties only). K: the kept pages are copied (one block each) and multiplied; V: `embedding_bag` sums
    the kept value rows weighted by the probabilities straight from the cache (no copy)."""
    Hkv, G, D = q_rows.shape
    S = k_cache.shape[2]
    m = index.shape[-1]
    ps = PAGE_SIZE
    # A page's 8 tokens are one contiguous block of its KV head: in an overlapping view of the flattened
    # cache whose row r holds tokens r..r+7, page j of KV head h of row b is row (b*Hkv + h)*S + 8j.
    current = p // ps
    # The only page that can run past the cache's end is the current one (the last visible page): its
    # block then starts at S-8, holding `shift` tokens of the page before, which are masked below.
    shift = max(current * ps + ps - S, 0)
    rows = torch.add(_head_base(b, Hkv, S), index, alpha=ps)
    if shift:
        rows = rows - (index == current).to(rows.dtype) * shift
    rows = rows.reshape(-1)
    flat = k_cache.shape[0] * Hkv * S
    n_rows = rows.numel()
    k_kept = torch.index_select(k_cache.as_strided((flat - ps + 1, ps * D), (D, 1)), 0, rows,
                                out=_BUFFERS.get("k", n_rows * ps * D, k_cache.dtype).view(n_rows, ps * D))
    cdt = q_rows.dtype
    k_kept = k_kept.view(Hkv * G, m * ps, D).to(cdt)
    logits = torch.bmm(q_rows.reshape(Hkv * G, 1, D), k_kept.transpose(1, 2)).mul_(scale)
    pages = logits.view(Hkv, G, m, ps)
    # Keys of the current page past p (and, with a shift, before the page) are not the query's to see.
    offset = p - current * ps + shift  # the query's slot in the current page's block
    if shift or offset < ps - 1:
        pages.masked_fill_((index == current)[..., None] & _outside(shift, offset), float("-inf"))
    if dropped is not None:
        pages.masked_fill_(dropped[..., None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [Hkv*G, 1, m*ps]
    if v_cache.dtype == cdt:
        tokens = (rows[:, None] + _SLOTS).reshape(-1)
        offsets = _bag_offsets(Hkv * G, m * ps)
        return F.embedding_bag(tokens, v_cache.view(-1, D), offsets, mode="sum",
                               per_sample_weights=probs.reshape(-1)).view(Hkv * G, 1, D)
    v_kept = torch.index_select(v_cache.as_strided((flat - ps + 1, ps * D), (D, 1)), 0, rows,
                                out=_BUFFERS.get("v", n_rows * ps * D, v_cache.dtype).view(n_rows, ps * D))
    return torch.bmm(probs, v_kept.view(Hkv * G, m * ps, D).to(cdt))  # [Hkv*G, 1, D]


_SLOTS = torch.arange(PAGE_SIZE)


def _outside(shift: int, offset: int) -> Tensor:
    """[8] bool: the slots of the current page's block outside [shift, offset] (not the query's keys)."""
    key = (shift, offset)
    mask = _OUTSIDE.get(key)
    if mask is None:
        mask = _OUTSIDE[key] = (_SLOTS < shift) | (_SLOTS > offset)
    return mask


_OUTSIDE: dict[tuple[int, int], Tensor] = {}


def _bag_offsets(bags: int, size: int) -> Tensor:
    key = (bags, size)
    offsets = _OFFSETS.get(key)
    if offsets is None:
        if len(_OFFSETS) > 4096:  # one entry per kept-page count seen: bounded anyway, but stay small
            _OFFSETS.clear()
        offsets = _OFFSETS[key] = torch.arange(bags) * size
    return offsets


_OFFSETS: dict[tuple[int, int], Tensor] = {}


def _head_base(b: int, n_heads: int, S: int) -> Tensor:
    """[n_heads, 1, 1] int64: the flattened cache row of token 0 of each KV head of batch row b."""
    key = (b, n_heads, S)
    base = _HEAD_BASE.get(key)
    if base is None:
        base = _HEAD_BASE[key] = ((b * n_heads + torch.arange(n_heads)) * S)[:, None, None]
    return base


_HEAD_BASE: dict[tuple[int, int, int], Tensor] = {}


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
