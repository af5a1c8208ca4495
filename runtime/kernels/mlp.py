"""Column-skipping sparse MLP input projection (TEAL's algorithm) for `solc::mlp`.

For each token only the kept input channels' weight columns of gate/up (or fc) are read. The kernels:

1. `_mlp_select_kernel` (one program per row): the reference's top-k channel selection exactly
   (`reference.prune_mlp_input`): keep_count(keep, d) channels of largest |x|, ties to the lower channel
   index. The k-th largest |x| is found by bisection over the float32 bit patterns of |x| (31 steps,
   exact), ties are resolved with a prefix sum. Writes the pruned row (kept values bit-exact, others 0)
   and, for a single row, the list of kept channels in ascending order.
2. `_mlp_union_kernel` (batch > 1): the union of the kept channels of each group of rows, as a list.
   Rows of a group share one pass over the weights; a row that did not keep a channel of the union
   multiplies it by its pruned 0, so the union never changes a row's result. union <= sum of the rows'
   kept counts, so the bytes read are never more than one GEMV per row would read.
3. `_mlp_in_kernel`: out[m, n] = sum over listed channels c of xp[m, c] * Wt[c, n], with
   Wt = [W_gate; W_up]^T (or W_gate_up^T, W_fc^T) of shape [d_in, n_total]: one input channel's weights
   are contiguous, so a kept channel is one contiguous row read. Gate and up share the channel list and
   are accumulated side by side (fused); accumulation is float32 (no atomics). Split-K over the channel
   list writes float32 partial sums to a scratch buffer; with one split the epilogue (bias, activation,
   act(gate) * up) runs in the same kernel, otherwise in `_mlp_epilogue_kernel`.

The down projection stays dense (cuBLAS via F.linear) and the output goes through the fused fake-quant
kernel (`runtime.kernels.quant`).

Weight layout: the transposed copy is made once per weight set and cached in `_WEIGHTS` (a dictionary
weakly keyed by the first input weight tensor; it dies with the weights and is rebuilt if a weight is
modified in place). It costs one extra copy of the MLP input projections on the device: gate+up =
2 * d_model * d_ffn elements per layer (SmolLM2-135M: 212 MB fp32 / 106 MB bf16 in all; Llama-3.2-1B bf16:
1.07 GB; Llama-3.1-8B bf16: 7.5 GB).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from runtime.kernels._common import INTERPRET, N_BUCKETS, cast_rtne, dot, keep_count, next_pow2, num_sms, scratch

ACT_IDS = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "relu": 3}
MAX_ROWS = 16  # rows the CUDA op runs through the sparse kernels; more rows (prefill) use the reference
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# ---------------------------------------------------------------------------------------------------
# kernels
# ---------------------------------------------------------------------------------------------------
@triton.jit
def _act(v, ACT: tl.constexpr):
    if ACT == 0:  # silu
        return v * tl.sigmoid(v)
    elif ACT == 1:  # gelu (erf)
        return 0.5 * v * (1.0 + tl.erf(v * 0.7071067811865476))
    elif ACT == 2:  # gelu (tanh approximation); tanh(y) = 2 * sigmoid(2y) - 1
        inner = 0.7978845608028654 * (v + 0.044715 * v * v * v)
        return 0.5 * v * (2.0 * tl.sigmoid(2.0 * inner))
    else:  # relu
        return tl.maximum(v, 0.0)


@triton.jit
def _epilogue(acc_g, acc_u, bias_ptr, n, n_ok, F, HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr):
    if HAS_BIAS:
        acc_g += tl.load(bias_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        if GATED:
            acc_u += tl.load(bias_ptr + F + n, mask=n_ok, other=0.0).to(tl.float32)
    h = _act(acc_g, ACT)
    if GATED:
        h = h * acc_u
    return h


@triton.jit
def _mlp_select_kernel(x_ptr, stride_xm, keep_ptr, xp_ptr, stride_pm, mask_ptr, idx_ptr, len_ptr, D,
                       BLOCK_D: tl.constexpr, WRITE_MASK: tl.constexpr, WRITE_LIST: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    inb = offs < D
    x = tl.load(x_ptr + row.to(tl.int64) * stride_xm + offs, mask=inb, other=0.0)
    # |x| >= 0, so its float32 bit pattern orders like the value (NaN above +inf, as torch.sort does)
    key = tl.abs(x.to(tl.float32)).to(tl.int32, bitcast=True).to(tl.int64)
    key = tl.where(inb, key, -1)
    k = keep_count(tl.load(keep_ptr + row).to(tl.float64), tl.zeros((), tl.int64) + D)
    # t = the k-th largest key: the largest t with #(key >= t) >= k (bisection over [0, 2^31 - 1])
    lo = tl.zeros((), tl.int64)
    hi = tl.zeros((), tl.int64) + 0x7FFFFFFF
    for _ in range(31):
        mid = lo + (hi - lo + 1) // 2
        ok = tl.sum((key >= mid).to(tl.int64), axis=0) >= k
        lo = tl.where(ok, mid, lo)
        hi = tl.where(ok, hi, mid - 1)
    gt = key > lo
    eq = key == lo
    need = k - tl.sum(gt.to(tl.int64), axis=0)
    rank = tl.cumsum(eq.to(tl.int32), axis=0)  # stable: among equal |x| the lower channels win
    kept = gt | (eq & (rank <= need))
    tl.store(xp_ptr + row.to(tl.int64) * stride_pm + offs, tl.where(kept, x, tl.zeros_like(x)), mask=inb)
    if WRITE_MASK:
        tl.store(mask_ptr + row.to(tl.int64) * D + offs, kept.to(tl.int8), mask=inb)
    if WRITE_LIST:  # single row: its kept channels, ascending
        pos = tl.cumsum(kept.to(tl.int32), axis=0) - 1
        tl.store(idx_ptr + row.to(tl.int64) * D + pos, offs, mask=kept & inb)
        tl.store(len_ptr + row, k.to(tl.int32))


@triton.jit
def _mlp_union_kernel(mask_ptr, idx_ptr, len_ptr, M, D, GROUP: tl.constexpr, BLOCK_D: tl.constexpr):
    g = tl.program_id(0)
    offs = tl.arange(0, BLOCK_D)
    inb = offs < D
    u = tl.zeros([BLOCK_D], tl.int32)
    for r in range(GROUP):
        row = g * GROUP + r
        u = u | tl.load(mask_ptr + row.to(tl.int64) * D + offs, mask=inb & (row < M), other=0).to(tl.int32)
    pos = tl.cumsum(u, axis=0) - 1
    tl.store(idx_ptr + g.to(tl.int64) * D + pos, offs, mask=(u > 0) & inb)
    tl.store(len_ptr + g, tl.sum(u, axis=0))


@triton.jit
def _mlp_in_kernel(xp_ptr, stride_pm, idx_ptr, len_ptr, wt_ptr, stride_wk, bias_ptr, part_ptr, h_ptr, stride_hm,
                   M, D, F, N_TOTAL, keep_bucket,
                   HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, SPLIT_K: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   USE_DOT: tl.constexpr, DOT_PRECISION: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    row_ok = rows < M
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < F
    L = tl.load(len_ptr + pid_m)
    chunk = tl.cdiv(tl.cdiv(L, SPLIT_K), BLOCK_K) * BLOCK_K
    k_start = pid_k * chunk
    k_end = tl.minimum(L, k_start + chunk)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    idx_row = idx_ptr + pid_m.to(tl.int64) * D
    x_rows = xp_ptr + rows.to(tl.int64)[:, None] * stride_pm
    for k0 in range(k_start, k_end, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_ok = kk < k_end
        ch = tl.load(idx_row + kk, mask=k_ok, other=0)
        xv = tl.load(x_rows + ch[None, :], mask=row_ok[:, None] & k_ok[None, :], other=0.0)  # [BM, BK]
        w_rows = wt_ptr + ch.to(tl.int64)[:, None] * stride_wk + n[None, :]
        w_ok = k_ok[:, None] & n_ok[None, :]
        wg = tl.load(w_rows, mask=w_ok, other=0.0)  # [BK, BN], each row contiguous
        if USE_DOT:
            acc_g = dot(xv, wg, acc_g, DOT_PRECISION)
        else:
            acc_g += tl.sum(xv.to(tl.float32)[:, :, None] * wg.to(tl.float32)[None, :, :], axis=1)
        if GATED:
            wu = tl.load(w_rows + F, mask=w_ok, other=0.0)
            if USE_DOT:
                acc_u = dot(xv, wu, acc_u, DOT_PRECISION)
            else:
                acc_u += tl.sum(xv.to(tl.float32)[:, :, None] * wu.to(tl.float32)[None, :, :], axis=1)
    out_ok = row_ok[:, None] & n_ok[None, :]
    if SPLIT_K == 1:
        h = _epilogue(acc_g, acc_u, bias_ptr, n, n_ok, F, HAS_BIAS, GATED, ACT)
        tl.store(h_ptr + rows.to(tl.int64)[:, None] * stride_hm + n[None, :], cast_rtne(h, h_ptr.dtype.element_ty),
                 mask=out_ok)
    else:
        part = part_ptr + (pid_k * M + rows).to(tl.int64)[:, None] * N_TOTAL + n[None, :]
        tl.store(part, acc_g, mask=out_ok)
        if GATED:
            tl.store(part + F, acc_u, mask=out_ok)


@triton.jit
def _mlp_epilogue_kernel(part_ptr, bias_ptr, h_ptr, stride_hm, M, F, N_TOTAL, SPLIT_K,
                         HAS_BIAS: tl.constexpr, GATED: tl.constexpr, ACT: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < F
    acc_g = tl.zeros([BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_N], tl.float32)
    for s in range(SPLIT_K):
        part = part_ptr + (s * M + row).to(tl.int64) * N_TOTAL + n
        acc_g += tl.load(part, mask=n_ok, other=0.0)
        if GATED:
            acc_u += tl.load(part + F, mask=n_ok, other=0.0)
    h = _epilogue(acc_g, acc_u, bias_ptr, n, n_ok, F, HAS_BIAS, GATED, ACT)
    tl.store(h_ptr + row.to(tl.int64) * stride_hm + n, cast_rtne(h, h_ptr.dtype.element_ty), mask=n_ok)


def _prune_configs(configs, named_args, **kwargs):
    bm, bn = kwargs.get("BLOCK_M", named_args.get("BLOCK_M")), kwargs.get("BLOCK_N", named_args.get("BLOCK_N"))
    use_dot = kwargs.get("USE_DOT", named_args.get("USE_DOT"))
    kept = [c for c in configs
            if (use_dot and c.kwargs["BLOCK_K"] >= 16) or (not use_dot and bm * bn * c.kwargs["BLOCK_K"] <= 8192)]
    return kept or configs[:1]


_IN_CONFIGS = [triton.Config({"BLOCK_K": bk}, num_warps=w, num_stages=3)
               for bk in (8, 16, 32, 64, 128) for w in (2, 4, 8)]
_mlp_in_tuned = triton.autotune(
    configs=_IN_CONFIGS,
    key=["D", "F", "keep_bucket", "BLOCK_M", "BLOCK_N", "SPLIT_K", "GATED"],
    prune_configs_by={"early_config_prune": _prune_configs},
)(_mlp_in_kernel)


# ---------------------------------------------------------------------------------------------------
# weights: the transposed copy, made once
# ---------------------------------------------------------------------------------------------------
@dataclass
class InputWeights:
    """Wt [d_in, n_total] (input channel-major) and the concatenated bias [n_total] (or None)."""

    wt: Tensor
    bias: Optional[Tensor]
    d_hidden: int  # F: width of h (gate/up each F wide when gated)
    gated: bool
    stamp: tuple


_WEIGHTS = WeakIdKeyDictionary()


def _version(t: Tensor) -> int:
    try:
        return t._version
    except RuntimeError:  # inference tensors keep no version counter
        return -1


def input_weights(w_in: list[Tensor], b_in: list[Optional[Tensor]], kind: str) -> InputWeights:
    """The cached transposed input projection of one MLP site (built on first use)."""
    parts = [*w_in, *[b for b in b_in if b is not None]]
    stamp = tuple((id(t), t.data_ptr(), _version(t), tuple(t.shape)) for t in parts) + (kind,)
    hit = _WEIGHTS.get(w_in[0])
    if hit is not None and hit.stamp == stamp:
        return hit
    with torch.no_grad():
        d = w_in[0].shape[1]
        if kind == "gated":
            F_ = w_in[0].shape[0]
            wt = torch.empty(d, 2 * F_, dtype=w_in[0].dtype, device=w_in[0].device)
            wt[:, :F_].copy_(w_in[0].detach().t())
            wt[:, F_:].copy_(w_in[1].detach().t())
        else:
            F_ = w_in[0].shape[0] // 2 if kind == "gated_fused" else w_in[0].shape[0]
            wt = w_in[0].detach().t().contiguous()
        bias = None
        if any(b is not None for b in b_in):
            if kind == "gated":
                bias = torch.cat([b.detach() if b is not None else w_in[0].new_zeros(F_) for b in b_in])
            else:
                bias = b_in[0].detach().contiguous()
    entry = InputWeights(wt, bias, F_, kind != "plain", stamp)
    _WEIGHTS[w_in[0]] = entry
    return entry


# ---------------------------------------------------------------------------------------------------
# launchers
# ---------------------------------------------------------------------------------------------------
def select_channels(x2d: Tensor, keep: Tensor, group: int) -> tuple[Tensor, Tensor, Tensor]:
    """Pruned x [M, d], channel lists [G, d] int32 (the first lens[g] entries are valid, ascending) and
    lens [G] int32, for groups of `group` rows."""
    M, D = x2d.shape
    G = triton.cdiv(M, group)
    block_d = next_pow2(D)
    warps = 4 if block_d <= 2048 else 8
    xp = scratch(x2d.shape, x2d.dtype, x2d.device)
    idx = torch.empty(G, D, dtype=torch.int32, device=x2d.device)
    lens = torch.empty(G, dtype=torch.int32, device=x2d.device)
    if M == 1:
        _mlp_select_kernel[(1,)](x2d, x2d.stride(0), keep, xp, xp.stride(0), idx, idx, lens, D,
                                 BLOCK_D=block_d, WRITE_MASK=False, WRITE_LIST=True, num_warps=warps,
                                 enable_fp_fusion=False)
    else:
        mask = torch.empty(M, D, dtype=torch.int8, device=x2d.device)
        _mlp_select_kernel[(M,)](x2d, x2d.stride(0), keep, xp, xp.stride(0), mask, idx, lens, D,
                                 BLOCK_D=block_d, WRITE_MASK=True, WRITE_LIST=False, num_warps=warps,
                                 enable_fp_fusion=False)
        _mlp_union_kernel[(G,)](mask, idx, lens, M, D, GROUP=group, BLOCK_D=block_d, num_warps=warps)
    return xp, idx, lens


def _default_split_k(n_programs: int, D: int, bucket: int, sms: int) -> int:
    kept = max(1, D * bucket // N_BUCKETS)
    split = max(1, min(triton.cdiv(2 * sms, n_programs), kept // 128))
    return min(16, 1 << (split.bit_length() - 1))  # a power of two <= split


def mlp_input_projection(x2d: Tensor, keep: Tensor, weights: InputWeights, act: str, *,
                         block_n: Optional[int] = None, block_k: Optional[int] = None,
                         split_k: Optional[int] = None, num_warps: Optional[int] = None,
                         bucket: Optional[int] = None, tuned: Optional[bool] = None,
                         out: Optional[Tensor] = None) -> Tensor:
    """h [M, F] = act(gate) * up (or act(fc)) of the pruned rows of x2d [M, d] (keep [M] float64),
    reading only the kept (union per group) weight columns; out: optional [M, F] buffer. Block sizes default to the launch heuristic;
    on CUDA BLOCK_K / warps / stages are autotuned (key includes the keep bucket) unless given."""
    M, D = x2d.shape
    if x2d.dtype not in DTYPES or weights.wt.dtype != x2d.dtype:
        raise TypeError(f"sparse MLP needs x and weights of one dtype in {DTYPES}, got {x2d.dtype}/{weights.wt.dtype}")
    if act not in ACT_IDS:
        raise ValueError(f"unknown activation {act!r}; valid choices: {list(ACT_IDS)}")
    x2d = x2d if x2d.stride(-1) == 1 else x2d.contiguous()
    keep = keep.reshape(M).to(torch.float64).contiguous()
    block_m = next_pow2(M) if M <= 8 else 16
    use_dot = block_m >= 16
    xp, idx, lens = select_channels(x2d, keep, block_m)
    F_, gated = weights.d_hidden, weights.gated
    n_total = weights.wt.shape[1]
    h = torch.empty(M, F_, dtype=x2d.dtype, device=x2d.device) if out is None else out
    if h.shape != (M, F_) or h.stride(-1) != 1 or h.dtype != x2d.dtype:
        raise ValueError(f"out must be a row-major [{M}, {F_}] {x2d.dtype} tensor")
    if bucket is None:
        bucket = N_BUCKETS
    block_n = block_n or (64 if F_ >= 64 else max(16, next_pow2(F_)))
    m_groups = triton.cdiv(M, block_m)
    n_blocks = triton.cdiv(F_, block_n)
    if split_k is None:
        split_k = _default_split_k(n_blocks * m_groups, D, bucket, num_sms(x2d))
    part = (scratch((split_k, M, n_total), torch.float32, x2d.device) if split_k > 1
            else h)  # unused with one split
    bias = weights.bias if weights.bias is not None else weights.wt
    prec = "ieee" if x2d.dtype == torch.float32 else "tf32"
    args = (xp, xp.stride(0), idx, lens, weights.wt, weights.wt.stride(0), bias, part, h, h.stride(0),
            M, D, F_, n_total, bucket)
    consts = dict(HAS_BIAS=weights.bias is not None, GATED=gated, ACT=ACT_IDS[act], SPLIT_K=split_k,
                  BLOCK_M=block_m, BLOCK_N=block_n, USE_DOT=use_dot, DOT_PRECISION=prec)
    grid = (n_blocks, m_groups, split_k)
    if tuned is None:
        tuned = x2d.is_cuda and not INTERPRET and block_k is None and num_warps is None
    if tuned:
        _mlp_in_tuned[grid](*args, **consts)
    else:
        if block_k is None:
            block_k = 16 if use_dot else max(8, min(64, 8192 // (block_m * block_n)))
        _mlp_in_kernel[grid](*args, **consts, BLOCK_K=block_k, num_warps=num_warps or 4)
    if split_k > 1:
        block_e = min(1024, next_pow2(F_))
        _mlp_epilogue_kernel[(M, triton.cdiv(F_, block_e))](
            part, bias, h, h.stride(0), M, F_, n_total, split_k,
            HAS_BIAS=weights.bias is not None, GATED=gated, ACT=ACT_IDS[act], BLOCK_N=block_e, num_warps=4)
    return h


def sparse_mlp(x: Tensor, keep: Tensor, bits: Tensor, w_in: list[Tensor], b_in: list[Optional[Tensor]],
               w_out: Tensor, b_out: Optional[Tensor], kind: str, act: str, **launch) -> Tensor:
    """`reference.mlp` with the sparse input projection, dense down projection (F.linear) and the fused
    fake-quant kernel. x [..., d]; keep, bits [...] (broadcast); any number of rows (grouped by 16).
    `launch` passes block sizes / split_k / bucket through to `mlp_input_projection`."""
    from runtime.kernels.quant import fake_quant_rows

    lead = x.shape[:-1]
    D = x.shape[-1]
    M = math.prod(lead)
    x2d = x.reshape(M, D)
    keep1 = torch.broadcast_to(torch.as_tensor(keep, device=x.device), lead).reshape(M)
    bits1 = torch.broadcast_to(torch.as_tensor(bits, device=x.device), lead).reshape(M)
    weights = input_weights(w_in, b_in, kind)
    h = mlp_input_projection(x2d, keep1, weights, act, **launch)
    y = F.linear(h, w_out, b_out)
    y = fake_quant_rows(y, bits1, out=y)
    return y.reshape(*lead, w_out.shape[0])
