"""CPU fast path of `solc::attention` for decode steps (one new token per row, any batch).

The reference (`reference.quest_decode`) scores every page, builds a key mask over the whole cache and
runs a masked softmax over all keys: it reads everything the action was meant to skip. This path reads
only what the action keeps.

fp32 (the CPU default) runs the C kernel `cpu_attention.c` (built into the library of `cpu_linear`): the
whole batch in one call, each (row, KV head) on its own, dense or sparse per row; the cache write and the
page-statistics refresh are one more C call (`write_step`). Sparse rows score the pages from their
min/max for the G query heads in one pass, take the k-th best score by quickselect (ties kept), and
attend over the kept pages' keys straight from the cache, prefetching the next kept page (scattered
2 KB blocks defeat the hardware prefetcher). Its softmax uses a vectorised exp within 2 ulp of expf.
fp64, bf16, and machines without a C compiler run the torch forms:

  dense rows (keep == 1, or every visible page kept)  one [G, D] @ [D, L] matmul per (row, KV head) over
                            the visible keys, softmax, @ V: no sort, no page scan, no mask
  sparse rows, gather form  page scores from the page min/max (two batched matmuls), the k-th best score
                            by kthvalue, the kept pages (ascending) from the mask; the kept pages' K
                            copied into a preallocated buffer (a page of 8 tokens is one contiguous block
                            of each KV head in the [B, Hkv, S, D] cache) and multiplied; V summed by
                            embedding_bag straight from the cache, the probabilities as weights
  sparse rows, masked form  where the query heads' kept pages are so many that copying them costs more
                            than reading the visible cache once per KV head (GQA: G query heads pick
                            their own pages), the exact dense-masked form: the same scores and kept set,
                            one masked softmax over the visible keys

Both sparse forms keep the reference's pages (tie rule: every page scoring >= the k-th best is kept), so
the result is the reference's up to float rounding (tests/runtime/ops/test_cpu_attention.py).

Batch invariance (DESIGN invariant 6): rows that share a position and a kept-page count form a group run
by batched ops that compute each (row, head) on its own (bmm, kthvalue, index_select, embedding_bag,
softmax over the last dim), so a row's output has the same bits alone or in any batch (tested). SDPA is
not used for fp32/fp64: its CPU flash kernel gives a row other bits inside a batch.
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
# fp32 steps run the C kernel (cpu_attention.c) when the kernel library builds; the torch forms below
# run for fp64 / bf16, without a compiler, and when this is False (tests pin each form).
C_KERNEL = True
# Up to this many rows, the new key/value and its page statistics are written with per-row slices (a
# handful of ops per row); above it, with the reference's batched scatter/gather (a fixed dozen ops).
SLICE_WRITE_MAX_ROWS = 2
# A group that is a strict subset of the batch copies its rows' visible keys/values (to run one batched
# call) up to this many bytes; beyond it each row runs on views of the cache.
SUBSET_COPY_BYTES = 16 * 2**20


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


def write_step(k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor, k: Tensor, v: Tensor,
               positions: list[int], position_tensor: Tensor) -> None:
    """A decode step's cache write: each row's new key/value at its position, and the statistics of the
    page that holds it refreshed (reference.write_kv + refresh_current_page): one C call for fp32, else
    per-row slices for few rows, the reference's batched ops for more."""
    lib = _library()
    if lib is not None and all(t.dtype == torch.float32 and t.is_contiguous()
                               for t in (k_cache, v_cache, page_min, page_max, k, v)):
        pos = torch.tensor(positions, dtype=torch.int64)
        B, Hkv, S, D = k_cache.shape
        lib.solc_write_kv(k.data_ptr(), v.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), page_min.data_ptr(),
                          page_max.data_ptr(), pos.data_ptr(), B, Hkv, S, page_min.shape[2], D)
        return
    if len(positions) <= SLICE_WRITE_MAX_ROWS:
        write_and_refresh(k_cache, v_cache, page_min, page_max, k, v, positions)
    else:
        from runtime.ops.library import write_kv
        from runtime.ops.reference import refresh_current_page

        write_kv(k_cache, v_cache, k, v, position_tensor)
        refresh_current_page(page_min, page_max, k_cache, position_tensor)


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
    over its cache row; the cache and page statistics already hold the row's keys <= its position.

    Rows at the same position keeping the same number of pages form a group computed by one set of
    batched ops (bmm, kthvalue, index_select, embedding_bag treat each (row, head) on its own, with the
    same kernel as a group of one: a row's bits do not depend on its group)."""
    lib = _library()
    if lib is not None and _c_kernel_supports(q, k_cache, v_cache, page_min, page_max):
        return _c_attention(lib, q, k_cache, v_cache, page_min, page_max, positions, keeps, scale)
    B = q.shape[0]
    groups: dict[tuple[int, Optional[int]], list[int]] = {}
    for b, (p, keep) in enumerate(zip(positions, keeps)):
        groups.setdefault((p, _kept_page_count(p, keep)), []).append(b)
    if len(groups) == 1:  # one group of every row: views of the caches, no copies
        (p, k_pages), = groups
        return _group(q, k_cache, v_cache, page_min, page_max, None, p, k_pages, scale)
    out = torch.empty_like(q)
    for (p, k_pages), rows in groups.items():
        sel = torch.tensor(rows)
        out[sel] = _group(q[sel], k_cache, v_cache, page_min, page_max, rows, p, k_pages, scale)
    return out


def _library():
    """The C kernels' library (cpu_linear builds one for every CPU kernel), or None: C_KERNEL off (tests pin
    the torch forms) or no compiler."""
    if not C_KERNEL:
        return None
    from runtime.ops import cpu_linear  # not at import: it registers with runtime.ops.library, which imports us

    return cpu_linear.library()


def _c_kernel_supports(q, k_cache, v_cache, page_min, page_max) -> bool:
    return (all(t.dtype == torch.float32 and t.is_contiguous() for t in (q, k_cache, v_cache, page_min, page_max))
            and q.shape[1] % k_cache.shape[1] == 0)


def _c_attention(lib, q: Tensor, k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor,
                 positions: list[int], keeps: list[float], scale: float) -> Tensor:
    """Every row in one call of the C kernel (cpu_attention.c): dense or sparse per row, from the cache."""
    B, Hq, _, D = q.shape
    Hkv, S, P = k_cache.shape[1], k_cache.shape[2], page_min.shape[2]
    G = Hq // Hkv
    kept = torch.tensor([_kept_page_count(p, keep) or 0 for p, keep in zip(positions, keeps)], dtype=torch.int64)
    pos = torch.tensor(positions, dtype=torch.int64)
    per_task = lib.solc_decode_attention_scratch(G, S, P, D)
    scratch = _BUFFERS.get("c_scratch", B * Hkv * per_task, torch.float32)
    out = torch.empty_like(q)
    lib.solc_decode_attention(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), page_min.data_ptr(), page_max.data_ptr(), pos.data_ptr(),
                              kept.data_ptr(), B, Hq, Hkv, S, P, D, scale, out.data_ptr(), scratch.data_ptr(),
                              per_task, torch.get_num_threads())
    return out


def _group(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor,
           rows: Optional[list[int]], p: int, k_pages: Optional[int], scale: float) -> Tensor:
    """Attention of the queries q [R, Hq, 1, D] of batch rows `rows` (None: every row, in order), all at
    position p keeping k_pages pages (None: every visible page, i.e. dense)."""
    if k_pages is None:
        return _dense_rows(q, k_cache, v_cache, rows, p + 1, scale)
    R, Hq, _, D = q.shape
    Hkv = k_cache.shape[1]
    G = Hq // Hkv
    n = p // PAGE_SIZE + 1
    cdt = _compute_dtype(q)
    q_rows = q.reshape(R * Hkv, G, D).to(cdt)
    low, high = _rows_of(page_min, rows)[:, :, :n], _rows_of(page_max, rows)[:, :, :n]
    low = low.reshape(R * Hkv, n, D).to(cdt)
    high = high.reshape(R * Hkv, n, D).to(cdt)
    # max(q*M, q*m) == q+ * M + q- * m (M >= m): the reference's page score as two matmuls per KV head
    scores = torch.baddbmm(q_rows.clamp(max=0) @ low.transpose(-1, -2), q_rows.clamp(min=0), high.transpose(-1, -2))
    # The reference keeps every page scoring >= the k-th best (ties at the threshold keep more than k).
    kth = torch.kthvalue(scores, n - k_pages + 1, dim=-1, keepdim=True).values
    kept = scores >= kth  # [R*Hkv, G, n]
    counts = kept.sum(-1)  # k_pages per head, more where pages tie, fewer where a NaN key scores NaN
    most, least = torch.stack([counts.max(), counts.min()]).tolist()
    if G * most * GATHER_COST >= n:
        out = _masked_form(q_rows, k_cache, v_cache, rows, p, kept, scale)
    elif most == least:  # every query head keeps the same number of pages, ascending from the mask
        index = kept.nonzero()[:, -1].view(R * Hkv, G, most)
        out = _gather_form(q_rows, k_cache, v_cache, rows, p, index, None, scale)
    else:  # a tie: every head copies the most pages any head keeps, and masks those it does not keep
        # (a NaN score, from a NaN key, is never kept, but topk ranks NaN above every number)
        index = torch.topk(scores.nan_to_num(nan=-math.inf), most, dim=-1).indices.sort(dim=-1).values
        out = _gather_form(q_rows, k_cache, v_cache, rows, p, index, ~torch.gather(kept, -1, index), scale)
    return out.reshape(R, Hq, 1, D).to(q.dtype)


def _dense_rows(q: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Optional[list[int]], length: int,
                scale: float) -> Tensor:
    """Dense attention of rows at one visible length, as one batched call over their keys (see _row_views)."""
    return torch.cat([_dense(q[sl], k, v, scale) for sl, k, v in _row_views(k_cache, v_cache, rows, length)])


def _row_views(k_cache: Tensor, v_cache: Tensor, rows: Optional[list[int]], length: int):
    """(query slice, keys, values [r, Hkv, length, D]) parts covering a group's rows: one view of the cache
    when the rows are consecutive (every row, one row: then (row, head) merge into one bmm batch without a
    copy); else one copy of the rows' visible keys/values where that is small (cheaper than a call per
    row), else one view per row."""
    if rows is None or rows == list(range(rows[0], rows[-1] + 1)):  # one view: [b0:b1] merges (row, head)
        k_rows, v_rows = (k_cache, v_cache) if rows is None else (k_cache[rows[0]:rows[-1] + 1], v_cache[rows[0]:rows[-1] + 1])
        return [(slice(None), k_rows[:, :, :length], v_rows[:, :, :length])]
    per_row = 2 * k_cache.shape[1] * length * k_cache.shape[3] * k_cache.element_size()
    if len(rows) * per_row <= SUBSET_COPY_BYTES:
        return [(slice(None), torch.stack([k_cache[b, :, :length] for b in rows]),
                 torch.stack([v_cache[b, :, :length] for b in rows]))]
    return [(slice(i, i + 1), k_cache[b:b + 1, :, :length], v_cache[b:b + 1, :, :length]) for i, b in enumerate(rows)]


def _strided_rows(t: Tensor, rows: Optional[list[int]]) -> Optional[Tensor]:
    """t's batch rows `rows` as a view when they are evenly spaced (None: all rows), else None."""
    if rows is None:
        return t
    step = rows[1] - rows[0] if len(rows) > 1 else 1
    if step > 0 and all(b - a == step for a, b in zip(rows, rows[1:])):
        return t[rows[0]:rows[-1] + 1:step]
    return None


def _rows_of(t: Tensor, rows: Optional[list[int]]) -> Tensor:
    """t's batch rows `rows`: a view when evenly spaced, else a copy (small tensors: page statistics)."""
    view = _strided_rows(t, rows)
    return view if view is not None else torch.stack([t[b] for b in rows])


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
    """Attention of the newest queries q [R, Hq, 1, D] over all their visible keys k, v [R, Hkv, L, D]
    (views of the cache): no mask needed (every key is <= the query). The G query heads of a KV head
    share one matmul, each (row, KV head) its own batch entry of a bmm: the same bits for a row alone or
    in a group, and on this CPU faster than SDPA's flash kernel for one query (which also gives a row
    other bits in a batch). bfloat16 keeps SDPA (the reference's precision)."""
    if q.dtype == torch.bfloat16:
        return torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1], scale=scale,
                                                         enable_gqa=k.shape[1] != q.shape[1])
                          for i in range(q.shape[0])])
    R, Hq, _, D = q.shape
    Hkv, L = k.shape[1], k.shape[2]
    q_rows = q.reshape(R * Hkv, Hq // Hkv, D)
    logits = torch.bmm(q_rows, k.reshape(R * Hkv, L, D).transpose(1, 2)).mul_(scale)
    return torch.bmm(torch.softmax(logits, dim=-1), v.reshape(R * Hkv, L, D)).view(R, Hq, 1, D)


def _compute_dtype(q: Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _gather_form(q_rows: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Optional[list[int]], p: int,
                 index: Tensor, dropped: Optional[Tensor], scale: float) -> Tensor:
    """Attend over each query head's kept pages only (index [R*Hkv, G, m], ascending, so the softmax sums
    in the reference's key order); `dropped` [R*Hkv, G, m] marks pages a head copies but does not keep
    (ties only). K: the kept pages are copied (one block each) and multiplied; V: `embedding_bag` sums
    the kept value rows weighted by the probabilities straight from the cache (no copy)."""
    RH, G, D = q_rows.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    m = index.shape[-1]
    ps = PAGE_SIZE
    # A page's 8 tokens are one contiguous block of its KV head: in an overlapping view of the flattened
    # cache whose row r holds tokens r..r+7, page j of KV head h of batch row b is row (b*Hkv + h)*S + 8j.
    current = p // ps
    # The only page that can run past the cache's end is the current one (the last visible page): its
    # block then starts at S-8, holding `shift` tokens of the page before, which are masked below.
    shift = max(current * ps + ps - S, 0)
    starts = torch.add(_head_base(rows, k_cache.shape[0], Hkv, S), index, alpha=ps)
    if shift:
        starts = starts - (index == current).to(starts.dtype) * shift
    starts = starts.reshape(-1)
    flat = k_cache.shape[0] * Hkv * S
    n_blocks = starts.numel()
    k_kept = torch.index_select(k_cache.as_strided((flat - ps + 1, ps * D), (D, 1)), 0, starts,
                                out=_BUFFERS.get("k", n_blocks * ps * D, k_cache.dtype).view(n_blocks, ps * D))
    cdt = q_rows.dtype
    k_kept = k_kept.view(RH * G, m * ps, D).to(cdt)
    logits = torch.bmm(q_rows.reshape(RH * G, 1, D), k_kept.transpose(1, 2)).mul_(scale)
    pages = logits.view(RH, G, m, ps)
    # Keys of the current page past p (and, with a shift, before the page) are not the query's to see.
    offset = p - current * ps + shift  # the query's slot in the current page's block
    if shift or offset < ps - 1:
        pages.masked_fill_((index == current)[..., None] & _outside(shift, offset), float("-inf"))
    if dropped is not None:
        pages.masked_fill_(dropped[..., None], float("-inf"))
    probs = torch.softmax(logits, dim=-1)  # [RH*G, 1, m*ps]
    if v_cache.dtype == cdt:
        tokens = (starts[:, None] + _SLOTS).reshape(-1)
        return F.embedding_bag(tokens, v_cache.view(-1, D), _bag_offsets(RH * G, m * ps), mode="sum",
                               per_sample_weights=probs.reshape(-1)).view(RH * G, 1, D)
    v_kept = torch.index_select(v_cache.as_strided((flat - ps + 1, ps * D), (D, 1)), 0, starts,
                                out=_BUFFERS.get("v", n_blocks * ps * D, v_cache.dtype).view(n_blocks, ps * D))
    return torch.bmm(probs, v_kept.view(RH * G, m * ps, D).to(cdt))  # [RH*G, 1, D]


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
        if len(_OFFSETS) > 4096:  # one entry per (bags, kept tokens) seen: stay small
            _OFFSETS.clear()
        offsets = _OFFSETS[key] = torch.arange(bags) * size
    return offsets


_OFFSETS: dict[tuple[int, int], Tensor] = {}


def _head_base(rows: Optional[list[int]], batch: int, n_heads: int, S: int) -> Tensor:
    """[R*n_heads, 1, 1] int64: the flattened cache token index of token 0 of each (row, KV head)."""
    key = (tuple(rows) if rows is not None else batch, n_heads, S)
    base = _HEAD_BASE.get(key)
    if base is None:
        if len(_HEAD_BASE) > 4096:
            _HEAD_BASE.clear()
        row_ids = torch.tensor(rows) if rows is not None else torch.arange(batch)
        base = _HEAD_BASE[key] = ((row_ids[:, None] * n_heads + torch.arange(n_heads)) * S).reshape(-1, 1, 1)
    return base


_HEAD_BASE: dict[tuple, Tensor] = {}


def _masked_form(q_rows: Tensor, k_cache: Tensor, v_cache: Tensor, rows: Optional[list[int]], p: int,
                 kept: Tensor, scale: float) -> Tensor:
    """One softmax over each row's visible keys with the unkept pages masked (kept [R*Hkv, G, n])."""
    RH, G, D = q_rows.shape
    length = p + 1
    n = kept.shape[-1]
    key_kept = kept[..., None].expand(RH, G, n, PAGE_SIZE).reshape(RH, G, n * PAGE_SIZE)[..., :length]
    Hkv = k_cache.shape[1]
    outs = []
    for sl, k, v in _row_views(k_cache, v_cache, rows, length):
        heads = slice(None) if sl.start is None else slice(sl.start * Hkv, sl.stop * Hkv)
        k = k.reshape(-1, length, D).to(q_rows.dtype)
        v = v.reshape(-1, length, D).to(q_rows.dtype)
        logits = torch.bmm(q_rows[heads], k.transpose(1, 2)).mul_(scale)  # [r*Hkv, G, length]
        probs = torch.softmax(logits.masked_fill_(~key_kept[heads], float("-inf")), dim=-1)
        outs.append(torch.bmm(probs, v))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


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
