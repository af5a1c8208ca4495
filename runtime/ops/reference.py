"""Reference semantics of the three efficiency axes (DESIGN.md "The three efficiency axes"), in plain
vectorised torch. Every fast path (Triton, torchao, compiled) must match these functions.

Pure math: no torch.library, no HF. Actions arrive as per-token level tensors (keep fractions and bit
widths, usually float64 rows of `ActionSpace.level_table()`), so one call serves a batch where every row
and every position has its own action.
"""
from __future__ import annotations

from typing import Optional, Union

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.ops import mlp_weights, quant_primitives

PAGE_SIZE = 8
QUANT_MODES = ("weight", "activation")
MLP_KINDS = ("gated", "gated_fused", "plain")
ACTIVATIONS = ("silu", "gelu", "gelu_tanh", "relu")

Number = Union[int, float]


# ---------------------------------------------------------------------------------------------------
# counts
# ---------------------------------------------------------------------------------------------------
def keep_count(keep: Union[Tensor, float], n: Union[Tensor, int]) -> Union[Tensor, int]:
    """How many of `n` items a keep fraction keeps: ceil(keep * n), clamped to [1, n].

    Robust to float error: keep is first snapped to a 1e-6 grid in float64 (so 0.6 given as float32,
    0.60000002, counts as 0.6), then ceil(keep * n - 1e-9), so 0.6 * 10 gives 6, never 7.
    `keep` and `n` may be tensors (broadcast; returns int64) or Python numbers (returns an int).
    """
    if not isinstance(keep, Tensor) and not isinstance(n, Tensor):
        # the same float64 arithmetic in Python (round is half-to-even in both): no tensor, so host-side
        # accounting (the cost models) never reads a tensor back
        n = int(n)
        count = math.ceil(round(float(keep) * 1e6) / 1e6 * n - 1e-9)
        return min(max(count, 1), n)
    keep_t = torch.as_tensor(keep)
    n_t = torch.as_tensor(n, device=keep_t.device)
    snapped = torch.round(keep_t.to(torch.float64) * 1e6) / 1e6
    count = torch.ceil(snapped * n_t.to(torch.float64) - 1e-9).to(torch.int64)
    count = torch.clamp(count, min=1)
    return torch.minimum(count, n_t.to(torch.int64))


def _compute_dtype(t: Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


# ---------------------------------------------------------------------------------------------------
# attn: Quest token-level attention sparsity
# ---------------------------------------------------------------------------------------------------
def quest_attention(
    q: Tensor,
    k_cache: Tensor,
    v_cache: Tensor,
    q_pos: Tensor,
    keep: Tensor,
    scale: float,
    page_size: int = PAGE_SIZE,
) -> Tensor:
    """Quest attention of every query over the keys at positions <= its own.

    q [B, Hq, T, D]; k_cache, v_cache [B, Hkv, S, D] hold keys/values at absolute positions 0..S-1
    (Hq % Hkv == 0; query head h reads KV head h // (Hq // Hkv)); q_pos int64 [B, T] is each query's
    absolute position p (must be < S; rows and positions need not be contiguous); keep [B, T] in (0, 1].

    For a query at p: kv_len = p + 1; keys form pages of `page_size` from key 0, of which
    ceil(kv_len / page_size) are visible. Each page's per-channel min/max key is taken per KV head over
    its keys <= p only (the page holding p is partial: statistics are causal, so a teacher-forced pass
    equals decoding). Page score = sum_c max(q_c * max_c, q_c * min_c), per query head.
    Budget = keep_count(keep, kv_len) tokens; k = min(ceil(budget / page_size), visible pages).
    Tie rule: every visible page whose score is >= the k-th best score is kept, so ties at the
    threshold may keep more than k pages. No page is forced (no sink/local page).
    The softmax (with `scale`) runs over all keys <= p in kept pages. keep == 1.0 keeps every visible
    page, i.e. exactly causal attention over keys 0..p.

    Computed in float32 (float64 if q is float64); returns q.dtype.
    """
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if Hq % Hkv != 0:
        raise ValueError(f"query heads {Hq} are not a multiple of KV heads {Hkv}")
    G = Hq // Hkv
    cdt = _compute_dtype(q)
    dev = q.device

    qc = q.to(cdt).reshape(B, Hkv, G, T, D)
    k = k_cache.to(cdt)
    v = v_cache.to(cdt)
    pos = q_pos.to(device=dev, dtype=torch.int64)  # [B, T]

    # Causal page statistics: running min/max within each page (prefix over the page's keys).
    P = (S + page_size - 1) // page_size
    pad = P * page_size - S
    kp = F.pad(k, (0, 0, 0, pad)) if pad else k  # padding is never read: it lies past every query
    kp = kp.reshape(B, Hkv, P, page_size, D)
    run_max = torch.cummax(kp, dim=3).values
    run_min = torch.cummin(kp, dim=3).values
    run_max = run_max.reshape(B, Hkv, P * page_size, D)
    run_min = run_min.reshape(B, Hkv, P * page_size, D)

    # max(q*M, q*m) == q+ * M + q- * m exactly (M >= m), so scores are two matmuls. Score the running
    # statistics at EVERY key position s (page start..s), then page j's score for a query at p is the
    # entry at min(p, last key of page j): full pages and the partial current page come out of the
    # same matmul, so equal statistics give bit-equal scores and ties are real ties.
    # The G query heads of a KV head and the T queries share one matmul ([G*T, D] @ [D, S]): no
    # broadcast copies of the keys per query head.
    q_rows = qc.reshape(B, Hkv, G * T, D)
    score_at = (q_rows.clamp(min=0) @ run_max.transpose(-1, -2) + q_rows.clamp(max=0) @ run_min.transpose(-1, -2))
    score_at = score_at.reshape(B, Hkv, G, T, P * page_size)
    page_ids = torch.arange(P, device=dev)
    page_last = page_ids * page_size + (page_size - 1)  # [P]
    col = torch.minimum(page_last, pos[..., None])  # [B, T, P]
    scores = torch.gather(score_at, -1, col[:, None, None].expand(B, Hkv, G, T, P))  # [B, Hkv, G, T, P]
    cur_page = (pos // page_size)[:, None, None, :, None]  # [B, 1, 1, T, 1]
    visible = page_ids <= cur_page  # [B, 1, 1, T, P]
    scores = scores.masked_fill(~visible, float("-inf"))

    # Pages to keep: min(ceil(budget / page_size), visible pages); ties at the k-th score kept.
    kv_len = pos + 1
    budget = keep_count(keep.to(dev), kv_len)  # [B, T]
    n_visible = pos // page_size + 1
    k_pages = torch.minimum((budget + page_size - 1) // page_size, n_visible)
    ranked = torch.sort(scores, dim=-1, descending=True).values
    kth = torch.gather(ranked, -1, (k_pages - 1)[:, None, None, :, None].expand(B, Hkv, G, T, 1))
    kept_pages = (scores >= kth) & visible  # [B, Hkv, G, T, P]

    # Key mask: key s is read iff s <= p and its page is kept.
    key_ids = torch.arange(S, device=dev)
    key_page = (key_ids // page_size).expand(B, Hkv, G, T, S)
    allowed = torch.gather(kept_pages, -1, key_page) & (key_ids <= pos[:, None, None, :, None])

    logits = (q_rows @ k.transpose(-1, -2)).reshape(B, Hkv, G, T, S) * scale
    logits = logits.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    out = probs.reshape(B, Hkv, G * T, S) @ v  # [B, Hkv, G*T, D]
    return out.reshape(B, Hq, T, D).to(q.dtype)


# ---------------------------------------------------------------------------------------------------
# mlp: structured activation pruning
# ---------------------------------------------------------------------------------------------------
def prune_mlp_input(x: Tensor, keep: Union[Tensor, float]) -> Tensor:
    """Keep, per token, the keep_count(keep, d) channels of x [..., d] with the largest |x|; zero the rest.

    keep has x's leading shape [...] (or broadcasts to it). Tie rule: stable, among channels of equal
    |x| the lower channel index wins. Kept values are returned bit-exact, so keep == 1.0 is the identity.
    """
    d = x.shape[-1]
    count = keep_count(torch.as_tensor(keep, device=x.device), d)  # [...]
    count = torch.broadcast_to(count, x.shape[:-1])
    order = torch.sort(x.abs(), dim=-1, descending=True, stable=True).indices
    in_sorted = torch.arange(d, device=x.device) < count[..., None]
    mask = torch.zeros(x.shape, dtype=torch.bool, device=x.device).scatter(-1, order, in_sorted)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


# ---------------------------------------------------------------------------------------------------
# quant: per-token activation fake quantization
# ---------------------------------------------------------------------------------------------------
def fake_quant(y: Tensor, bits: Union[Tensor, Number]) -> Tensor:
    """Symmetric per-token fake quantization of y [..., d] to `bits` [...] (float or int tensor).

    absmax over the last dim in float32 (float64 if y is), scale = max(absmax, 1e-8) / qmax with
    qmax = 2^(b-1) - 1, round half to even, clamp to +-qmax, dequantize, cast back to y.dtype.
    Rows with b >= 16 are returned unchanged (bit-exact). b must be >= 2 (qmax >= 1).
    """
    cdt = _compute_dtype(y)
    b = torch.as_tensor(bits, device=y.device)
    b = torch.broadcast_to(b, y.shape[:-1])[..., None]  # [..., 1]
    yc = y.to(cdt)
    qmax = torch.exp2(b.to(cdt) - 1) - 1
    absmax = yc.abs().amax(dim=-1, keepdim=True)
    s = torch.clamp(absmax, min=1e-8) / qmax
    yq = torch.minimum(torch.maximum(torch.round(yc / s), -qmax), qmax) * s
    return torch.where(b >= 16, y, yq.to(y.dtype))


# ---------------------------------------------------------------------------------------------------
# a whole MLP site
# ---------------------------------------------------------------------------------------------------
def _activation(act: str):
    if act == "silu":
        return F.silu
    if act == "gelu":
        return F.gelu
    if act == "gelu_tanh":
        return lambda t: F.gelu(t, approximate="tanh")
    if act == "relu":
        return F.relu
    raise ValueError(f"unknown activation {act!r}; valid choices: {list(ACTIVATIONS)}")


def _input_projection(xp: Tensor, w_in: list[Tensor], b_in: list[Optional[Tensor]], kind: str) -> Tensor:
    """[..., N_in]: gate and up side by side for "gated" (the fast paths' layout)."""
    if kind == "gated":
        return torch.cat([F.linear(xp, w_in[0], b_in[0]), F.linear(xp, w_in[1], b_in[1])], dim=-1)
    return F.linear(xp, w_in[0], b_in[0])


def _hidden(pre: Tensor, kind: str, fn) -> Tensor:
    if kind == "plain":
        return fn(pre)
    gate, up = pre.chunk(2, dim=-1)
    return fn(gate) * up


def _input_bias(b_in: list[Optional[Tensor]], w_in: list[Tensor], kind: str) -> Optional[Tensor]:
    if all(b is None for b in b_in):
        return None
    if kind == "gated":
        return torch.cat([b if b is not None else w.new_zeros(w.shape[0]) for b, w in zip(b_in, w_in)])
    return b_in[0]


def lowbit_linear(x: Tensor, w: Tensor, bias: Optional[Tensor]) -> Tensor:
    """The weight-quant linear: round_bf16(x_bf16 @ w^T) + bias, accumulated in float32 (float64 for
    float64 inputs); w is the dequantized low-bit copy (exact in that dtype). The product is rounded to
    bf16 because that is what the int8/int4 kernels return; the bias is added after it, unrounded."""
    cdt = _compute_dtype(x)
    y = quant_primitives.to_bf16_grid(quant_primitives.to_bf16_grid(x, cdt) @ w.to(cdt).t(), cdt)
    return y if bias is None else y + bias.to(cdt)


def dequantized(packs: dict, bits: int, group_size: int, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """(W_in, W_out) of a site at `bits` (4 or 8), dequantized from its copies into `dtype`."""
    if bits == 8:
        if packs["in8"] is None or packs["out8"] is None:
            raise ValueError("solc::mlp: an 8-bit row ran, but the site has no int8 weight copies")
        return (quant_primitives.dequant_int8(packs["in8"], packs["in8_scale"], dtype),
                quant_primitives.dequant_int8(packs["out8"], packs["out8_scale"], dtype))
    if bits == 4:
        if packs["in4"] is None or packs["out4"] is None:
            raise ValueError("solc::mlp: a 4-bit row ran, but the site has no int4 weight copies")
        return (quant_primitives.dequant_int4(packs["in4"], packs["in4_sz"], group_size, dtype),
                quant_primitives.dequant_int4(packs["out4"], packs["out4_sz"], group_size, dtype))
    raise ValueError(f"solc::mlp in quant='weight' mode: bits {bits} has no weight copy; valid: [4, 8, 16]")


def lowbit_mlp(xp: Tensor, bits: int, b_in: list[Optional[Tensor]], w_in: list[Tensor], w_out: Tensor,
               b_out: Optional[Tensor], kind: str, act: str, packs: dict, group_size: int) -> Tensor:
    """An MLP site on (already pruned) rows xp [..., d] with the `bits` weight copies of every linear."""
    cdt = _compute_dtype(xp)
    wi, wo = dequantized(packs, bits, group_size, cdt)
    pre = lowbit_linear(xp, wi, _input_bias(b_in, w_in, kind))
    return lowbit_linear(_hidden(pre, kind, _activation(act)), wo, b_out).to(xp.dtype)


def mlp(
    x: Tensor,
    keep: Optional[Tensor],
    bits: Optional[Tensor],
    w_in: list[Tensor],
    b_in: list[Optional[Tensor]],
    w_out: Tensor,
    b_out: Optional[Tensor],
    kind: str,
    act: str,
    quant: str = "activation",
    packs: Optional[list] = None,
    group_size: int = 0,
) -> Tensor:
    """One MLP site under per-token actions.

    x [..., d_in]; keep, bits [...] (bits may be one int: the level of every row). kind:
      "gated"       w_in = [w_gate, w_up]:  h = act(x Wg^T + bg) * (x Wu^T + bu)
      "gated_fused" w_in = [w_gate_up]:     gate = first half of the output features, up = second half
                                            (Phi-3 layout), h = act(gate) * up
      "plain"       w_in = [w_fc]:          h = act(x W^T + b)
    then down = h Wout^T + b_out. act: "silu", "gelu" (exact erf), "gelu_tanh", "relu".
    The input is first pruned to its top-|x| channels (`prune_mlp_input(x, keep)`). Then per `quant`:
      "activation" (the paper's): fake_quant(down(h(x_pruned)), bits)
      "weight": rows at bits 16 run the module's weights; rows at bits 8 / 4 run every linear as
                `lowbit_linear` with the site's int8 / int4 copies (`packs`, see runtime.ops.mlp_weights;
                int4 groups of `group_size` input channels).
    Uses F.linear, so keep == 1.0 and bits == 16 match the nn.Linear modules bit for bit.
    keep=None / bits=None skip that axis (same result as all-dense levels, without the work).
    """
    if kind not in MLP_KINDS:
        raise ValueError(f"unknown MLP kind {kind!r}; valid choices: {list(MLP_KINDS)}")
    if quant not in QUANT_MODES:
        raise ValueError(f"unknown quant mode {quant!r}; valid choices: {list(QUANT_MODES)}")
    fn = _activation(act)
    n_in = 2 if kind == "gated" else 1
    if len(w_in) != n_in or len(b_in) != n_in:
        raise ValueError(
            f"MLP kind {kind!r} takes {n_in} input weight(s) and bias(es), got {len(w_in)} and {len(b_in)}"
        )
    xp = x if keep is None else prune_mlp_input(x, keep)

    def dense(rows: Tensor) -> Tensor:  # exactly the modules' op sequence (bit-equal to HF)
        if kind == "gated":
            h = fn(F.linear(rows, w_in[0], b_in[0])) * F.linear(rows, w_in[1], b_in[1])
        else:
            h = _hidden(F.linear(rows, w_in[0], b_in[0]), kind, fn)
        return F.linear(h, w_out, b_out)

    if bits is None:
        return dense(xp)
    if quant == "activation":
        return fake_quant(dense(xp), bits)
    # weight mode: each row runs the copy of its level; rows are grouped by level.
    table = mlp_weights.unpack(packs)
    lead, d = x.shape[:-1], x.shape[-1]
    rows = xp.reshape(-1, d)
    row_bits = torch.broadcast_to(torch.as_tensor(bits, device=x.device), lead).reshape(-1)
    # An int `bits` is one level for every row, known on the host (no device read to find the levels).
    levels = [int(bits)] if isinstance(bits, int) else sorted({int(b) for b in row_bits.unique().tolist()})
    out = None
    for level in levels:
        run = (lambda r: dense(r)) if level >= 16 else (
            lambda r, b=level: lowbit_mlp(r, b, b_in, w_in, w_out, b_out, kind, act, table, group_size))
        if len(levels) == 1:
            return run(rows).reshape(*lead, -1)
        index = (row_bits == level).nonzero().squeeze(1)
        y = run(rows.index_select(0, index))
        if out is None:
            out = y.new_empty(rows.shape[0], y.shape[-1])
        out.index_copy_(0, index, y)
    return out.reshape(*lead, -1)


# ---------------------------------------------------------------------------------------------------
# attn: page metadata kept in the KV cache (what a decode kernel scores instead of reading all keys)
# ---------------------------------------------------------------------------------------------------
def page_stats(k_cache: Tensor, lengths: Tensor, page_size: int = PAGE_SIZE) -> tuple[Tensor, Tensor]:
    """Per-page, per-channel (min, max) of k_cache [B, Hkv, S, D] over each row's first `lengths[b]`
    keys. Returns two [B, Hkv, ceil(S / page_size), D] tensors; a page with no valid key holds
    (+inf, -inf), so it can never win a max/min and scores -inf against any nonzero query."""
    B, H, S, D = k_cache.shape
    P = (S + page_size - 1) // page_size
    valid = torch.arange(P * page_size, device=k_cache.device)[None, :] < lengths[:, None]  # [B, P*ps]
    valid = valid[:, None, :, None]
    padded = F.pad(k_cache, (0, 0, 0, P * page_size - S)) if P * page_size != S else k_cache
    low = padded.masked_fill(~valid, float("inf")).reshape(B, H, P, page_size, D).amin(dim=3)
    high = padded.masked_fill(~valid, float("-inf")).reshape(B, H, P, page_size, D).amax(dim=3)
    return low, high


def refresh_current_page(page_min: Tensor, page_max: Tensor, k_cache: Tensor, positions: Tensor,
                         page_size: int = PAGE_SIZE) -> None:
    """After writing ONE new key per row at positions [B, 1], recompute (in place) the statistics of
    the page that holds it over that page's keys <= the position: O(page_size) per row, instead of
    `page_stats` over the whole cache. Equal to page_stats for every page of a row of that length."""
    B, H, S, D = k_cache.shape
    pos = positions[:, 0]
    page = pos // page_size
    offsets = torch.arange(page_size, device=k_cache.device)
    slots = page[:, None] * page_size + offsets  # [B, ps]
    valid = (slots <= pos[:, None])[:, None, :, None]
    keys = k_cache.gather(2, slots.clamp(max=S - 1)[:, None, :, None].expand(B, H, page_size, D))
    low = keys.masked_fill(~valid, float("inf")).amin(dim=2, keepdim=True)
    high = keys.masked_fill(~valid, float("-inf")).amax(dim=2, keepdim=True)
    index = page[:, None, None, None].expand(B, H, 1, D)
    page_min.scatter_(2, index, low.to(page_min.dtype))
    page_max.scatter_(2, index, high.to(page_max.dtype))


def quest_decode(q: Tensor, k_cache: Tensor, v_cache: Tensor, page_min: Tensor, page_max: Tensor,
                 q_pos: Tensor, keep: Tensor, scale: float, page_size: int = PAGE_SIZE) -> Tensor:
    """`quest_attention` for one query per row that is its row's newest token (a decode step), scoring
    pages from the cache's page metadata instead of the keys: O(pages) scoring, as a decode kernel
    does. q [B, Hq, 1, D]; page_min/page_max [B, Hkv, >= ceil(S / page_size), D] hold each page's
    statistics over the row's keys <= q_pos (true right after the step's key was written)."""
    B, Hq, T, D = q.shape
    Hkv, S = k_cache.shape[1], k_cache.shape[2]
    if T != 1:
        raise ValueError(f"quest_decode scores one query per row, got T={T}")
    G = Hq // Hkv
    cdt = _compute_dtype(q)
    dev = q.device
    P = (S + page_size - 1) // page_size
    pos = q_pos[:, 0].to(device=dev, dtype=torch.int64)  # [B]
    q_rows = q.to(cdt).reshape(B, Hkv, G, D)
    high, low = page_max[:, :, :P].to(cdt), page_min[:, :, :P].to(cdt)
    scores = q_rows.clamp(min=0) @ high.transpose(-1, -2) + q_rows.clamp(max=0) @ low.transpose(-1, -2)
    n_visible = pos // page_size + 1
    visible = torch.arange(P, device=dev) < n_visible[:, None, None, None]  # [B, 1, 1, P]
    scores = scores.masked_fill(~visible, float("-inf"))  # also clears 0 * inf on empty pages
    budget = keep_count(keep[:, 0].to(dev), pos + 1)
    k_pages = torch.minimum((budget + page_size - 1) // page_size, n_visible)
    ranked = torch.sort(scores, dim=-1, descending=True).values
    kth = torch.gather(ranked, -1, (k_pages - 1)[:, None, None, None].expand(B, Hkv, G, 1))
    kept_pages = (scores >= kth) & visible  # [B, Hkv, G, P]
    key_ids = torch.arange(S, device=dev)
    allowed = kept_pages[..., key_ids // page_size] & (key_ids <= pos[:, None, None, None])
    logits = (q_rows @ k_cache.to(cdt).transpose(-1, -2)) * scale  # [B, Hkv, G, S]
    probs = torch.softmax(logits.masked_fill(~allowed, float("-inf")), dim=-1)
    return (probs @ v_cache.to(cdt)).reshape(B, Hq, 1, D).to(q.dtype)
