"""Quest decode attention (one query per row) for `solc::attention`, split-K / flash-decoding style.

Per decode step, for rows b with their own position p_b (kv_len = p_b + 1) and keep level:

1. `_append_kv_kernel`   (B*Hkv programs) writes the step's key/value at p_b and recomputes the page
   statistics (per-channel min/max key) of the page holding p_b over its keys <= p_b: bit-equal to
   `reference.refresh_current_page`.
2. `_page_score_kernel`  (B*Hkv x page blocks) scores every visible page for each query head of the KV
   head from the metadata alone: score = q+ . max + q- . min (= sum_c max(q_c max_c, q_c min_c)),
   float32 accumulation; pages past the row's last visible page are not touched.
3. `_page_select_kernel` (B*Hkv programs) finds, per query head, the k-th best score exactly (bisection
   over the order-preserving integer image of the float32 scores, 32 steps; k = min(ceil(budget / 8),
   visible pages), budget = keep_count(keep, kv_len) computed in-kernel like the reference) and keeps
   every visible page scoring >= it (the reference's tie rule). It writes the threshold of each head
   and the list of pages that ANY head of the group keeps (the union, ascending): K/V pages are read
   once per KV head, each query head masks the pages it did not select. When k equals the visible
   page count the bisection is skipped (every page is kept).
4. `_quest_attn_kernel`  (B*Hkv x splits) splits the page list evenly across programs; each reads only
   its pages' keys/values (whole 8-token pages, the row's last page only up to p_b), computes
   the G query heads' logits with one dot (heads padded to 16 rows), masks per head, and keeps an
   online softmax in float32; partial (max, sum, acc) go to a scratch buffer.
5. `_combine_kernel`     (B*Hq programs) merges the splits and writes the output in q's dtype.

Only decode (T == 1) runs here; prefill / teacher forcing (T > 1) stays on the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from runtime.kernels._common import INTERPRET, N_BUCKETS, cast_rtne, dot, keep_count, next_pow2, num_sms, scratch
from runtime.ops.reference import PAGE_SIZE

DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@triton.jit
def _append_kv_kernel(k_ptr, skb, skh, skd, v_ptr, svb, svh, svd,
                      kc_ptr, scb, sch, scs, scd, vc_ptr, tcb, tch, tcs, tcd,
                      pmin_ptr, pmax_ptr, spb, sph, spp, spd, pos_ptr, stride_pos, Hkv, D,
                      PAGE: tl.constexpr, BLOCK_D: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // Hkv
    h = pid % Hkv
    p = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    kn = tl.load(k_ptr + b * skb + h * skh + d * skd, mask=dm, other=0.0).to(kc_ptr.dtype.element_ty)
    vn = tl.load(v_ptr + b * svb + h * svh + d * svd, mask=dm, other=0.0).to(vc_ptr.dtype.element_ty)
    kc_row = kc_ptr + b.to(tl.int64) * scb + h.to(tl.int64) * sch
    tl.store(kc_row + p * scs + d * scd, kn, mask=dm)
    tl.store(vc_ptr + b.to(tl.int64) * tcb + h.to(tl.int64) * tch + p * tcs + d * tcd, vn, mask=dm)
    # the page holding p: its older keys come from the cache, the new one from registers
    page = p // PAGE
    t = page * PAGE + tl.arange(0, PAGE)
    old = t < p
    keys = tl.load(kc_row + t[:, None] * scs + d[None, :] * scd, mask=old[:, None] & dm[None, :], other=0.0)
    keys = keys.to(tl.float32)
    knf = kn.to(tl.float32)
    low = tl.minimum(tl.min(tl.where(old[:, None], keys, float("inf")), axis=0), knf)
    high = tl.maximum(tl.max(tl.where(old[:, None], keys, float("-inf")), axis=0), knf)
    stat = b.to(tl.int64) * spb + h.to(tl.int64) * sph + page * spp + d * spd
    tl.store(pmin_ptr + stat, cast_rtne(low, pmin_ptr.dtype.element_ty), mask=dm)
    tl.store(pmax_ptr + stat, cast_rtne(high, pmax_ptr.dtype.element_ty), mask=dm)


@triton.jit
def _page_score_kernel(q_ptr, sqb, sqh, sqd, pmin_ptr, pmax_ptr, spb, sph, spp, spd, pos_ptr, stride_pos,
                       score_ptr, Hkv, G, P, D,
                       PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_D: tl.constexpr,
                       DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    blk = tl.program_id(1)
    b = pid // Hkv
    h = pid % Hkv
    p = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    n_visible = p // PAGE + 1
    if blk * BLOCK_P < n_visible:
        pages = blk * BLOCK_P + tl.arange(0, BLOCK_P)
        vis = pages < n_visible
        g = tl.arange(0, BLOCK_G)
        gm = g < G
        d = tl.arange(0, BLOCK_D)
        dm = d < D
        q = tl.load(q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :] * sqd,
                    mask=gm[:, None] & dm[None, :], other=0.0)
        zero = tl.zeros_like(q)
        stat = b.to(tl.int64) * spb + h.to(tl.int64) * sph + pages[None, :] * spp + d[:, None] * spd  # [BD, BP]
        smask = vis[None, :] & dm[:, None]
        hi_t = tl.load(pmax_ptr + stat, mask=smask, other=0.0)
        lo_t = tl.load(pmin_ptr + stat, mask=smask, other=0.0)
        s = dot(tl.where(q > 0, q, zero), hi_t, None, DOT_PRECISION)
        s = dot(tl.where(q < 0, q, zero), lo_t, s, DOT_PRECISION)
        rows = (b * Hkv + h) * G + g
        tl.store(score_ptr + rows.to(tl.int64)[:, None] * P + pages[None, :], s, mask=gm[:, None] & vis[None, :])


@triton.jit
def _score_key(s):
    """Order-preserving int64 image of float32 scores (-0.0 taken as +0.0)."""
    bits = s.to(tl.int32, bitcast=True)
    bits = tl.where(bits == -2147483648, 0, bits)
    return tl.where(bits < 0, bits ^ 0x7FFFFFFF, bits).to(tl.int64)


@triton.jit
def _key_score(key):
    k32 = key.to(tl.int32)
    return tl.where(k32 < 0, k32 ^ 0x7FFFFFFF, k32).to(tl.float32, bitcast=True)


@triton.jit
def _page_select_kernel(score_ptr, pos_ptr, stride_pos, keep_ptr, stride_keep, thr_ptr, list_ptr, count_ptr,
                        Hkv, G, P, PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_P: tl.constexpr):
    pid = tl.program_id(0)
    b = pid // Hkv
    p = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    n_visible = p // PAGE + 1
    budget = keep_count(tl.load(keep_ptr + b * stride_keep).to(tl.float64), p + 1)
    k_pages = tl.minimum((budget + PAGE - 1) // PAGE, n_visible)
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    rows = score_ptr + (pid * G + g).to(tl.int64)[:, None] * P
    thr = tl.full([BLOCK_G], float("-inf"), tl.float32)
    if k_pages < n_visible:
        # per head: the largest t with #(visible keys >= t) >= k_pages, t in int32 range (32 halvings)
        lo = tl.full([BLOCK_G], -2147483648, tl.int64)
        hi = tl.full([BLOCK_G], 2147483647, tl.int64)
        for _ in range(32):
            mid = lo + (hi - lo + 1) // 2
            cnt = tl.zeros([BLOCK_G], tl.int64)
            for c0 in range(0, n_visible, BLOCK_P):
                pages = c0 + tl.arange(0, BLOCK_P)
                ok = gm[:, None] & (pages < n_visible)[None, :]
                key = _score_key(tl.load(rows + pages[None, :], mask=ok, other=0.0))
                cnt += tl.sum(((key >= mid[:, None]) & ok).to(tl.int64), axis=1)
            sel = cnt >= k_pages
            lo = tl.where(sel, mid, lo)
            hi = tl.where(sel, hi, mid - 1)
        thr = _key_score(lo)
    tl.store(thr_ptr + pid * G + g, thr, mask=gm)
    # pages any head of the group keeps, ascending
    base = tl.zeros((), tl.int32)
    for c0 in range(0, n_visible, BLOCK_P):
        pages = c0 + tl.arange(0, BLOCK_P)
        pv = pages < n_visible
        ok = gm[:, None] & pv[None, :]
        s = tl.load(rows + pages[None, :], mask=ok, other=float("-inf"))
        u = tl.max(((s >= thr[:, None]) & ok).to(tl.int32), axis=0)
        pos = base + tl.cumsum(u, axis=0) - 1
        tl.store(list_ptr + pid.to(tl.int64) * P + pos, pages.to(tl.int32), mask=(u > 0) & pv)
        base += tl.sum(u, axis=0)
    tl.store(count_ptr + pid, base)


@triton.jit
def _quest_attn_kernel(q_ptr, sqb, sqh, sqd, kc_ptr, scb, sch, scs, scd, vc_ptr, tcb, tch, tcs, tcd,
                       score_ptr, thr_ptr, list_ptr, count_ptr, pos_ptr, stride_pos,
                       m_ptr, l_ptr, acc_ptr, scale, Hkv, G, P, D, SPLITS, keep_bucket,
                       PAGE: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_D: tl.constexpr,
                       BLOCK_PAGES: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    split = tl.program_id(1)
    b = pid // Hkv
    h = pid % Hkv
    p = tl.load(pos_ptr + b * stride_pos).to(tl.int64)
    cnt = tl.load(count_ptr + pid)
    per = tl.cdiv(tl.cdiv(cnt, SPLITS), BLOCK_PAGES) * BLOCK_PAGES
    e_start = split * per
    e_end = tl.minimum(cnt, e_start + per)
    g = tl.arange(0, BLOCK_G)
    gm = g < G
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    q = tl.load(q_ptr + b * sqb + (h * G + g)[:, None] * sqh + d[None, :] * sqd,
                mask=gm[:, None] & dm[None, :], other=0.0)
    thr = tl.load(thr_ptr + pid * G + g, mask=gm, other=float("inf"))
    head_rows = score_ptr + (pid * G + g).to(tl.int64)[:, None] * P
    kc_row = kc_ptr + b.to(tl.int64) * scb + h.to(tl.int64) * sch
    vc_row = vc_ptr + b.to(tl.int64) * tcb + h.to(tl.int64) * tch
    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    j = tl.arange(0, BLOCK_PAGES * PAGE)
    for e0 in range(e_start, e_end, BLOCK_PAGES):
        e = e0 + j // PAGE
        e_ok = e < e_end
        page = tl.load(list_ptr + pid.to(tl.int64) * P + e, mask=e_ok, other=0).to(tl.int64)
        tok = page * PAGE + j % PAGE
        t_ok = e_ok & (tok <= p)
        sc = tl.load(head_rows + page[None, :], mask=gm[:, None] & t_ok[None, :], other=float("-inf"))
        allowed = (sc >= thr[:, None]) & t_ok[None, :]
        kt = tl.load(kc_row + tok[None, :] * scs + d[:, None] * scd, mask=t_ok[None, :] & dm[:, None], other=0.0)
        logits = dot(q, kt, None, DOT_PRECISION) * scale
        logits = tl.where(allowed, logits, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_use)
        pexp = tl.exp(logits - m_use[:, None])
        l_i = l_i * alpha + tl.sum(pexp, axis=1)
        vt = tl.load(vc_row + tok[:, None] * tcs + d[None, :] * tcd, mask=t_ok[:, None] & dm[None, :], other=0.0)
        acc = dot(cast_rtne(pexp, vc_ptr.dtype.element_ty), vt, acc * alpha[:, None], DOT_PRECISION)
        m_i = m_new
    out_row = (pid * G + g).to(tl.int64) * SPLITS + split
    tl.store(m_ptr + out_row, m_i, mask=gm)
    tl.store(l_ptr + out_row, l_i, mask=gm)
    tl.store(acc_ptr + out_row[:, None] * D + d[None, :], acc, mask=gm[:, None] & dm[None, :])


@triton.jit
def _combine_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, SPLITS, D, BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)  # b * Hq + hq; out is [B, Hq, 1, D] contiguous
    s = tl.arange(0, BLOCK_S)
    sm = s < SPLITS
    d = tl.arange(0, BLOCK_D)
    dm = d < D
    m = tl.load(m_ptr + row.to(tl.int64) * SPLITS + s, mask=sm, other=float("-inf"))
    l = tl.load(l_ptr + row.to(tl.int64) * SPLITS + s, mask=sm, other=0.0)
    mx = tl.max(m, axis=0)
    w = tl.where(m == float("-inf"), 0.0, tl.exp(m - mx))
    total = tl.sum(l * w, axis=0)
    acc = tl.load(acc_ptr + (row.to(tl.int64) * SPLITS + s)[:, None] * D + d[None, :],
                  mask=sm[:, None] & dm[None, :], other=0.0)
    out = tl.sum(acc * w[:, None], axis=0) / total
    tl.store(out_ptr + row.to(tl.int64) * D + d, cast_rtne(out, out_ptr.dtype.element_ty), mask=dm)


_ATTN_CONFIGS = [triton.Config({"BLOCK_PAGES": bp}, num_warps=w, num_stages=2)
                 for bp in (4, 8, 16) for w in (4, 8)]
_quest_attn_tuned = triton.autotune(configs=_ATTN_CONFIGS, key=["P", "D", "G", "SPLITS", "keep_bucket"])(
    _quest_attn_kernel)


def _strides4(t: Tensor) -> tuple[int, int, int, int]:
    return tuple(t.stride())  # type: ignore[return-value]


def append_kv(k: Tensor, v: Tensor, k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor,
              positions: Tensor) -> None:
    """Write one new key/value per row (k, v [B, Hkv, 1, D]) at positions [B, 1] and refresh the
    statistics of the page that holds it (in place)."""
    B, Hkv, _, D = k_cache.shape
    block_d = next_pow2(D)
    skb, skh, _, skd = _strides4(k)
    svb, svh, _, svd = _strides4(v)
    _append_kv_kernel[(B * Hkv,)](k, skb, skh, skd, v, svb, svh, svd,
                                  k_cache, *_strides4(k_cache), v_cache, *_strides4(v_cache),
                                  page_min, page_max, *_strides4(page_min), positions, positions.stride(0),
                                  Hkv, D, PAGE=PAGE_SIZE, BLOCK_D=block_d, num_warps=1 if block_d <= 64 else 2)


def _default_splits(B: int, Hkv: int, P: int, block_pages: int, bucket: int, sms: int) -> int:
    pages = max(1, P * bucket // N_BUCKETS)
    splits = max(1, min(triton.cdiv(2 * sms, B * Hkv), triton.cdiv(pages, 2 * block_pages)))
    return min(64, next_pow2(splits))


def quest_decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor,
                           positions: Tensor, keep: Tensor, scale: float, *, k: Optional[Tensor] = None,
                           v: Optional[Tensor] = None, splits: Optional[int] = None,
                           block_pages: Optional[int] = None, block_p: int = 64, select_block: int = 256,
                           num_warps: Optional[int] = None, bucket: Optional[int] = None,
                           tuned: Optional[bool] = None, out: Optional[Tensor] = None) -> Tensor:
    """Quest attention of q [B, Hq, 1, D] over the caches [B, Hkv, S, D] (`reference.quest_decode`).

    With k, v given ([B, Hkv, 1, D]) they are first appended at `positions` [B, 1] and the page
    statistics refreshed (what solc::attention does). page_min/page_max [B, Hkv, >= ceil(S/8), D];
    keep [B, 1] float64. Returns a contiguous [B, Hq, 1, D] tensor in q's dtype (`out` if given)."""
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if T != 1:
        raise ValueError(f"quest_decode_attention takes one query per row, got T={T}")
    if Hq % Hkv:
        raise ValueError(f"query heads {Hq} are not a multiple of KV heads {Hkv}")
    dtypes = {q.dtype, k_cache.dtype, v_cache.dtype, page_min.dtype, page_max.dtype}
    if len(dtypes) != 1 or q.dtype not in DTYPES:
        raise TypeError(f"quest_decode_attention needs one dtype in {DTYPES} for q, caches and page stats, got {dtypes}")
    G = Hq // Hkv
    P = (S + PAGE_SIZE - 1) // PAGE_SIZE
    dev = q.device
    positions = positions.reshape(B, 1)
    keep = keep.reshape(B, 1).to(torch.float64)
    if k is not None:
        append_kv(k, v, k_cache, v_cache, page_min, page_max, positions)
    if bucket is None:
        bucket = N_BUCKETS
    block_g = max(16, next_pow2(G))
    block_d = max(16, next_pow2(D))
    prec = "ieee" if q.dtype == torch.float32 else "tf32"
    sqb, sqh, _, sqd = _strides4(q)

    scores = scratch((B * Hkv * G, P), torch.float32, dev)
    _page_score_kernel[(B * Hkv, triton.cdiv(P, block_p))](
        q, sqb, sqh, sqd, page_min, page_max, *_strides4(page_min), positions, positions.stride(0),
        scores, Hkv, G, P, D, PAGE=PAGE_SIZE, BLOCK_G=block_g, BLOCK_P=block_p, BLOCK_D=block_d,
        DOT_PRECISION=prec, num_warps=4)

    thr = scratch((B * Hq,), torch.float32, dev)
    pages = torch.empty(B * Hkv, P, dtype=torch.int32, device=dev)
    counts = torch.empty(B * Hkv, dtype=torch.int32, device=dev)
    _page_select_kernel[(B * Hkv,)](scores, positions, positions.stride(0), keep, keep.stride(0), thr, pages, counts,
                                    Hkv, G, P, PAGE=PAGE_SIZE, BLOCK_G=next_pow2(G), BLOCK_P=select_block,
                                    num_warps=4, enable_fp_fusion=False)

    if tuned is None:
        tuned = q.is_cuda and not INTERPRET and block_pages is None and num_warps is None
    if splits is None:
        splits = _default_splits(B, Hkv, P, block_pages or 8, bucket, num_sms(q))
    m_part = scratch((B * Hq, splits), torch.float32, dev)
    l_part = scratch((B * Hq, splits), torch.float32, dev)
    acc_part = scratch((B * Hq, splits, D), torch.float32, dev)
    args = (q, sqb, sqh, sqd, k_cache, *_strides4(k_cache), v_cache, *_strides4(v_cache),
            scores, thr, pages, counts, positions, positions.stride(0), m_part, l_part, acc_part,
            float(scale), Hkv, G, P, D, splits, bucket)
    consts = dict(PAGE=PAGE_SIZE, BLOCK_G=block_g, BLOCK_D=block_d, DOT_PRECISION=prec)
    grid = (B * Hkv, splits)
    if tuned:
        _quest_attn_tuned[grid](*args, **consts)
    else:
        _quest_attn_kernel[grid](*args, **consts, BLOCK_PAGES=block_pages or 4, num_warps=num_warps or 4)

    if out is None:
        out = torch.empty(B, Hq, 1, D, dtype=q.dtype, device=dev)
    elif out.shape != (B, Hq, 1, D) or not out.is_contiguous() or out.dtype != q.dtype:
        raise ValueError(f"out must be a contiguous [{B}, {Hq}, 1, {D}] {q.dtype} tensor")
    _combine_kernel[(B * Hq,)](m_part, l_part, acc_part, out, splits, D,
                               BLOCK_S=next_pow2(splits), BLOCK_D=next_pow2(D), num_warps=1 if D <= 64 else 2)
    return out
