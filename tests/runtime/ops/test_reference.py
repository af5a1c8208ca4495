"""The reference ops against independent naive implementations (explicit Python loops, exact fractions)."""
import math
from fractions import Fraction

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from runtime.actions import DEFAULT_LEVELS
from runtime.ops import reference as R

PS = 8
ATTN = list(DEFAULT_LEVELS["attn"])
MLP = list(DEFAULT_LEVELS["mlp"])
BITS = list(DEFAULT_LEVELS["quant"])
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-12, rtol=1e-12)}


def naive_count(level: float, n: int) -> int:
    return min(max(math.ceil(Fraction(str(level)) * n), 1), n)


# ---------------------------------------------------------------------------------------------------
# naive implementations
# ---------------------------------------------------------------------------------------------------
def naive_quest(q, k, v, q_pos, levels, scale, ps=PS):
    """q [B,Hq,T,D], k/v [B,Hkv,S,D] tensors; q_pos [B][T] ints; levels [B][T] Python floats. fp64 math."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    Q, K, V = q.double().tolist(), k.double().tolist(), v.double().tolist()
    out = torch.zeros(B, Hq, T, D, dtype=torch.float64)
    for b in range(B):
        for h in range(Hq):
            hk = h // g
            for t in range(T):
                p = q_pos[b][t]
                kv_len = p + 1
                qv = Q[b][h][t]
                n_pages = math.ceil(Fraction(kv_len, ps))
                scores = []
                for j in range(n_pages):
                    keys = range(j * ps, min((j + 1) * ps, kv_len))
                    sc = 0.0
                    for c in range(D):
                        mx = max(K[b][hk][s][c] for s in keys)
                        mn = min(K[b][hk][s][c] for s in keys)
                        sc += max(qv[c] * mx, qv[c] * mn)
                    scores.append(sc)
                budget = naive_count(levels[b][t], kv_len)
                n_keep = min(math.ceil(Fraction(budget, ps)), n_pages)
                thr = sorted(scores, reverse=True)[n_keep - 1]
                kept = {j for j in range(n_pages) if scores[j] >= thr}
                sel = [s for s in range(kv_len) if s // ps in kept]
                logits = [scale * sum(qv[c] * K[b][hk][s][c] for c in range(D)) for s in sel]
                m = max(logits)
                w = [math.exp(x - m) for x in logits]
                z = sum(w)
                for c in range(D):
                    out[b, h, t, c] = sum(w[i] * V[b][hk][s][c] for i, s in enumerate(sel)) / z
    return out


def naive_prune(x, levels):
    """x [N, d] tensor, levels [N] floats: keep the largest |x| (lower index wins ties)."""
    N, d = x.shape
    out = torch.zeros_like(x)
    for n in range(N):
        row = x[n].tolist()
        order = sorted(range(d), key=lambda c: (-abs(row[c]), c))
        for c in order[: naive_count(levels[n], d)]:
            out[n, c] = x[n, c]
    return out


def naive_fake_quant(y, bits):
    """y [N, d] tensor, bits [N] ints. Per-row loop; divisions in the op's compute dtype."""
    cdt = torch.float64 if y.dtype == torch.float64 else torch.float32
    out = y.clone()
    for n in range(y.shape[0]):
        b = int(bits[n])
        if b >= 16:
            continue
        qmax = 2 ** (b - 1) - 1
        row = [torch.tensor(float(e), dtype=cdt) for e in y[n].tolist()]
        absmax = max(abs(float(e)) for e in row)
        s = torch.tensor(max(absmax, 1e-8), dtype=cdt) / torch.tensor(float(qmax), dtype=cdt)
        for c, e in enumerate(row):
            level = round(float(e / s))  # Python round: half to even
            level = max(-qmax, min(qmax, level))
            out[n, c] = (torch.tensor(float(level), dtype=cdt) * s).to(y.dtype)
    return out


def naive_act(a, x):
    if a == "silu":
        return x / (1 + math.exp(-x))
    if a == "gelu":
        return 0.5 * x * (1 + math.erf(x / math.sqrt(2)))
    if a == "gelu_tanh":
        return 0.5 * x * (1 + math.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    return max(x, 0.0)


def naive_linear(x, w, b):
    W = w.double().tolist()
    bias = b.double().tolist() if b is not None else [0.0] * len(W)
    return [sum(xi * wi for xi, wi in zip(x, W[o])) + bias[o] for o in range(len(W))]


def naive_mlp(x, keep_levels, bit_levels, w_in, b_in, w_out, b_out, kind, act):
    """x [N, d]; per token: prune, MLP in fp64 Python floats, then quantize."""
    xp = naive_prune(x.double(), keep_levels)
    ys = []
    for n in range(x.shape[0]):
        row = xp[n].tolist()
        if kind == "gated":
            g = naive_linear(row, w_in[0], b_in[0])
            u = naive_linear(row, w_in[1], b_in[1])
        elif kind == "gated_fused":
            gu = naive_linear(row, w_in[0], b_in[0])
            g, u = gu[: len(gu) // 2], gu[len(gu) // 2 :]
        else:
            g = naive_linear(row, w_in[0], b_in[0])
            u = [1.0] * len(g)
        h = [naive_act(act, gi) * ui for gi, ui in zip(g, u)]
        ys.append(naive_linear(h, w_out, b_out))
    y = torch.tensor(ys, dtype=torch.float64).to(x.dtype)
    return naive_fake_quant(y, bit_levels)


# ---------------------------------------------------------------------------------------------------
# keep_count
# ---------------------------------------------------------------------------------------------------
GRID = [0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.35, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8, 0.85, 0.9,
        0.95, 0.99, 1.0, 0.125, 0.333, 0.001]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_keep_count_robust_to_float_error(dtype):
    n = torch.arange(1, 4097)
    for level in GRID:
        got = R.keep_count(torch.tensor(level, dtype=dtype), n)
        assert got.dtype == torch.int64
        want = [naive_count(level, int(i)) for i in n]
        assert got.tolist() == want, level
        # per-element keep tensors (e.g. [B, T]) broadcast against per-element n too
        got2 = R.keep_count(torch.full((4096,), level, dtype=dtype), n)
        assert got2.tolist() == want


def test_keep_count_python_numbers():
    assert R.keep_count(0.6, 10) == 6 and isinstance(R.keep_count(0.6, 10), int)
    assert R.keep_count(0.6, 5) == 3
    assert R.keep_count(0.1, 3) == 1  # ceil(0.3)
    assert R.keep_count(0.001, 7) == 1  # clamped to >= 1
    assert R.keep_count(1.0, 576) == 576
    assert R.keep_count(float(torch.tensor(0.6, dtype=torch.float32)), 10) == 6
    for level in GRID:
        for n in (1, 7, 10, 30, 100, 576, 1000):
            assert R.keep_count(level, n) == naive_count(level, n)


# ---------------------------------------------------------------------------------------------------
# quest attention
# ---------------------------------------------------------------------------------------------------
def _qkv(B, Hq, Hkv, T, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, T, D, generator=g, dtype=dtype)
    k = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    v = torch.randn(B, Hkv, S, D, generator=g, dtype=dtype)
    return q, k, v


S_CACHE = 29  # not a multiple of 8
Q_POS = [
    [23, 24, 25, 26, 27, 28],  # decode-like tail, last page partial (24..28)
    [0, 3, 8, 15, 16, 21],  # page boundaries, first keys
    [28, 7, 12, 19, 2, 9],  # unordered
]


def _levels_table(choices, B, T, seed):
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(choices), (B, T), generator=g)
    idx.view(-1)[: len(choices)] = torch.arange(len(choices))  # every level appears
    return [[choices[i] for i in row] for row in idx.tolist()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("heads", [(4, 2), (4, 4), (4, 1)], ids=["gqa", "mha", "mqa"])
@pytest.mark.parametrize("mode", ["mixed", *[f"keep{l}" for l in ATTN]])
def test_quest_matches_naive(dtype, heads, mode):
    Hq, Hkv = heads
    B, T, D = 3, 6, 8
    q, k, v = _qkv(B, Hq, Hkv, T, S_CACHE, D, dtype, seed=hash((Hq, Hkv)) % 1000)
    if mode == "mixed":
        levels = _levels_table(ATTN, B, T, seed=1)  # a different action per row and per position
    else:
        levels = [[float(mode[4:])] * T for _ in range(B)]
    # keep arrives as float32 for fp32 models (snap makes it count like the exact level) and float64
    keep = torch.tensor(levels, dtype=dtype)
    scale = 1 / math.sqrt(D)
    out = R.quest_attention(q, k, v, torch.tensor(Q_POS), keep, scale)
    assert out.dtype == dtype and out.shape == q.shape
    ref = naive_quest(q, k, v, Q_POS, levels, scale)
    torch.testing.assert_close(out.double(), ref, **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_quest_teacher_forced_matches_naive(dtype):
    B, Hq, Hkv, S, D = 2, 4, 2, 19, 8
    q, k, v = _qkv(B, Hq, Hkv, S, S, D, dtype, seed=5)
    pos = [list(range(S))] * B
    levels = _levels_table(ATTN, B, S, seed=2)
    out = R.quest_attention(q, k, v, torch.tensor(pos), torch.tensor(levels, dtype=torch.float64), 0.4)
    torch.testing.assert_close(out.double(), naive_quest(q, k, v, pos, levels, 0.4), **TOL[dtype])


def test_quest_sparse_levels_are_not_dense():
    """Guard against vacuous tests: the low levels really drop pages at these sizes."""
    q, k, v = _qkv(3, 4, 2, 6, S_CACHE, 8, torch.float64, seed=3)
    pos = torch.tensor(Q_POS)
    dense = R.quest_attention(q, k, v, pos, torch.ones(3, 6, dtype=torch.float64), 0.35)
    for level in (0.1, 0.6):
        sparse = R.quest_attention(q, k, v, pos, torch.full((3, 6), level, dtype=torch.float64), 0.35)
        assert (sparse - dense).abs().amax() > 1e-3


@pytest.mark.parametrize("heads", [(4, 2), (3, 3)])
def test_quest_keep1_equals_sdpa_causal(heads):
    Hq, Hkv = heads
    B, S, D = 2, 21, 16
    q, k, v = _qkv(B, Hq, Hkv, S, S, D, torch.float32, seed=7)
    pos = torch.arange(S).expand(B, S)
    out = R.quest_attention(q, k, v, pos, torch.ones(B, S), 0.25)
    kr, vr = k.repeat_interleave(Hq // Hkv, 1), v.repeat_interleave(Hq // Hkv, 1)
    want = F.scaled_dot_product_attention(q, kr, vr, is_causal=True, scale=0.25)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    # arbitrary positions: causal = a boolean mask key <= pos
    qp = torch.tensor(Q_POS)
    q2 = q[:, :, : qp.shape[1]].repeat(2, 1, 1, 1)[:3]
    k2, v2 = _qkv(3, Hq, Hkv, 1, S_CACHE, D, torch.float32, seed=8)[1:]
    out2 = R.quest_attention(q2, k2, v2, qp, torch.ones(3, 6), 0.25)
    mask = (torch.arange(S_CACHE) <= qp[:, :, None])[:, None]
    want2 = F.scaled_dot_product_attention(
        q2, k2.repeat_interleave(Hq // Hkv, 1), v2.repeat_interleave(Hq // Hkv, 1), attn_mask=mask, scale=0.25
    )
    torch.testing.assert_close(out2, want2, atol=1e-5, rtol=1e-5)


def test_quest_ignores_keys_after_the_query():
    """Statistics are causal: what the cache holds after position p (stale or future keys) never matters."""
    B, Hq, Hkv, D = 3, 4, 2, 8
    q, k, v = _qkv(B, Hq, Hkv, 6, S_CACHE, D, torch.float64, seed=11)
    pos = torch.tensor(Q_POS)
    keep = torch.tensor(_levels_table(ATTN, B, 6, seed=4), dtype=torch.float64)
    base = R.quest_attention(q, k, v, pos, keep, 0.3)
    for b in range(B):
        for t in range(6):
            p = int(pos[b, t])
            k2, v2 = k.clone(), v.clone()
            k2[b, :, p + 1 :] = 100 * torch.randn_like(k2[b, :, p + 1 :])
            v2[b, :, p + 1 :] = 100 * torch.randn_like(v2[b, :, p + 1 :])
            out = R.quest_attention(q[b : b + 1, :, t : t + 1], k2[b : b + 1], v2[b : b + 1], pos[b : b + 1, t : t + 1],
                                    keep[b : b + 1, t : t + 1], 0.3)
            torch.testing.assert_close(out[0, :, 0], base[b, :, t], atol=1e-12, rtol=1e-12)


def test_quest_decode_step_equals_teacher_forced_row():
    """One query at p over a cache sliced to p + 1 keys == row p of the teacher-forced pass."""
    q, k, v = _qkv(2, 4, 2, 21, 21, 8, torch.float64, seed=13)
    pos = torch.arange(21).expand(2, 21)
    keep = torch.tensor(_levels_table(ATTN, 2, 21, seed=6), dtype=torch.float64)
    tf = R.quest_attention(q, k, v, pos, keep, 0.3)
    for p in range(21):
        step = R.quest_attention(q[:, :, p : p + 1], k[:, :, : p + 1], v[:, :, : p + 1], pos[:, p : p + 1],
                                 keep[:, p : p + 1], 0.3)
        torch.testing.assert_close(step[:, :, 0], tf[:, :, p], atol=1e-12, rtol=1e-12)


def test_quest_ties_at_threshold_are_kept():
    """Pages 0 and 2 have identical keys (equal scores), page 1 scores lower; budget allows 1 page."""
    D = 8
    g = torch.Generator().manual_seed(17)
    page = torch.randn(PS, D, generator=g, dtype=torch.float64)
    k = torch.cat([page, 0.01 * torch.randn(PS, D, generator=g, dtype=torch.float64), page])[None, None]
    v = torch.randn(1, 1, 3 * PS, D, generator=g, dtype=torch.float64)
    q = torch.randn(1, 1, 1, D, generator=g, dtype=torch.float64)
    pos = torch.tensor([[3 * PS - 1]])
    out = R.quest_attention(q, k, v, pos, torch.tensor([[0.1]], dtype=torch.float64), 0.5)  # 3 tokens -> 1 page
    sel = list(range(PS)) + list(range(2 * PS, 3 * PS))
    w = torch.softmax(0.5 * q[0, 0, 0] @ k[0, 0, sel].T, dim=-1)
    torch.testing.assert_close(out[0, 0, 0], w @ v[0, 0, sel], atol=1e-12, rtol=1e-12)
    # the naive reference agrees on the tie rule
    torch.testing.assert_close(out, naive_quest(q, k, v, [[3 * PS - 1]], [[0.1]], 0.5), atol=1e-12, rtol=1e-12)


def test_quest_tie_between_full_page_and_partial_current_page():
    """Page 0 repeats keys a..d twice; the current page 2 holds a..d so far (p = 19): equal statistics."""
    D = 8
    g = torch.Generator().manual_seed(29)
    abcd = torch.randn(4, D, generator=g, dtype=torch.float64)
    k = torch.cat([abcd, abcd, 0.01 * torch.randn(PS, D, generator=g, dtype=torch.float64), abcd])[None, None]
    v = torch.randn(1, 1, 20, D, generator=g, dtype=torch.float64)
    q = torch.randn(1, 2, 1, D, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.float64):
        out = R.quest_attention(q.to(dtype), k.to(dtype), v.to(dtype), torch.tensor([[19]]),
                                torch.tensor([[0.1]]), 0.5)  # 2 tokens -> 1 page, but pages 0 and 2 tie
        sel = list(range(PS)) + list(range(2 * PS, 20))
        for h in range(2):
            w = torch.softmax(0.5 * q[0, h, 0] @ k[0, 0, sel].T, dim=-1)
            torch.testing.assert_close(out[0, h, 0].double(), w @ v[0, 0, sel], **TOL[dtype])


def test_quest_low_precision_io():
    q, k, v = _qkv(2, 4, 2, 6, 29, 8, torch.float32, seed=19)
    pos = torch.tensor(Q_POS[:2])
    keep = torch.full((2, 6), 0.6)
    out = R.quest_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), pos, keep, 0.3)
    assert out.dtype == torch.bfloat16
    want = R.quest_attention(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), pos, keep, 0.3)
    torch.testing.assert_close(out, want.bfloat16())


# ---------------------------------------------------------------------------------------------------
# mlp input pruning
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("d", [16, 37])
def test_prune_matches_naive(dtype, d):
    B, T = 3, 5
    x = torch.randn(B, T, d, dtype=dtype, generator=torch.Generator().manual_seed(d))
    levels = _levels_table(MLP, B, T, seed=d)
    for keep_dtype in (torch.float32, torch.float64):
        got = R.prune_mlp_input(x, torch.tensor(levels, dtype=keep_dtype))
        want = naive_prune(x.reshape(-1, d), [l for row in levels for l in row]).reshape(B, T, d)
        assert torch.equal(got, want)
    for level in MLP:
        got = R.prune_mlp_input(x, torch.full((B, T), level, dtype=torch.float64))
        assert torch.equal(got, naive_prune(x.reshape(-1, d), [level] * (B * T)).reshape(B, T, d))
        assert ((got != 0).sum(-1) == naive_count(level, d)).all()


def test_prune_keep1_is_identity_and_ties_lower_index_wins():
    x = torch.randn(4, 10)
    assert torch.equal(R.prune_mlp_input(x, torch.ones(4)), x)
    t = torch.tensor([[1.0, -1.0, 1.0, 0.5, -1.0]])
    # keep 0.4 of 5 -> 2 channels: the first two of the four |x| == 1 channels
    assert R.prune_mlp_input(t, torch.tensor([0.4])).tolist() == [[1.0, -1.0, 0.0, 0.0, -0.0]]
    assert R.prune_mlp_input(t, torch.tensor([0.8])).tolist() == [[1.0, -1.0, 1.0, 0.0, -1.0]]
    same = torch.full((1, 8), 2.0)
    assert R.prune_mlp_input(same, torch.tensor([0.4])).tolist() == [[2.0, 2.0, 2.0, 2.0, 0, 0, 0, 0]]


# ---------------------------------------------------------------------------------------------------
# fake quantization
# ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_fake_quant_matches_naive(dtype):
    B, T, d = 3, 5, 24
    y = 3 * torch.randn(B, T, d, dtype=dtype, generator=torch.Generator().manual_seed(23))
    levels = _levels_table(BITS, B, T, seed=8)
    flat = [b for row in levels for b in row]
    for bits_dtype in (torch.float64, torch.int64, torch.float32):
        got = R.fake_quant(y, torch.tensor(levels, dtype=bits_dtype))
        want = naive_fake_quant(y.reshape(-1, d), flat).reshape(B, T, d)
        torch.testing.assert_close(got, want, **TOL[dtype])
    for b in BITS:
        got = R.fake_quant(y, torch.full((B, T), float(b), dtype=torch.float64))
        torch.testing.assert_close(got, naive_fake_quant(y.reshape(-1, d), [b] * (B * T)).reshape(B, T, d),
                                   **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_fake_quant_16_bits_is_bit_exact_identity(dtype):
    y = (torch.randn(4, 6, 32) * torch.logspace(-3, 3, 32)).to(dtype)
    assert torch.equal(R.fake_quant(y, torch.full((4, 6), 16.0, dtype=torch.float64)), y)
    assert torch.equal(R.fake_quant(y, torch.full((4, 6), 16, dtype=torch.int64)), y)
    # mixed rows: the 16-bit rows stay bit-exact, the others change
    bits = torch.tensor([[16, 5, 16, 7, 16, 5]] * 4)
    out = R.fake_quant(y, bits)
    assert torch.equal(out[bits == 16], y[bits == 16])
    assert not torch.equal(out[bits == 5], y[bits == 5])


@pytest.mark.parametrize("b", [5, 7])
def test_fake_quant_level_count(b):
    qmax = 2 ** (b - 1) - 1
    y = torch.randn(8, 512)
    out = R.fake_quant(y, torch.full((8,), b))
    for row, orow in zip(out, y):
        assert len(torch.unique(row)) <= 2 * qmax + 1
        assert (row.abs().amax() - orow.abs().amax()).abs() < 1e-6  # absmax maps onto +-qmax exactly-ish


def test_fake_quant_round_half_to_even():
    # 5 bits: qmax 15; absmax 15 -> scale 1.0 exactly
    y = torch.tensor([[15.0, 0.5, 1.5, 2.5, -0.5, -1.5, -2.5, 3.5]])
    assert R.fake_quant(y, torch.tensor([5])).tolist() == [[15.0, 0.0, 2.0, 2.0, -0.0, -2.0, -2.0, 4.0]]
    zero_row = torch.zeros(1, 4)
    assert torch.equal(R.fake_quant(zero_row, torch.tensor([5])), zero_row)  # scale floor 1e-8: no NaN


# ---------------------------------------------------------------------------------------------------
# whole MLP site
# ---------------------------------------------------------------------------------------------------
def _mlp_weights(kind, d, hid, dtype, seed, bias):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=dtype) / math.sqrt(s[-1])  # noqa: E731
    n_out = 2 * hid if kind == "gated_fused" else hid
    w_in = [rnd(n_out, d)] + ([rnd(hid, d)] if kind == "gated" else [])
    b_in = [rnd(w.shape[0]) if bias else None for w in w_in]
    return w_in, b_in, rnd(d, hid), (rnd(d) if bias else None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    "kind, act, bias",
    [("gated", "silu", False), ("gated_fused", "silu", False), ("plain", "gelu", True),
     ("plain", "gelu_tanh", True), ("gated", "relu", True), ("gated_fused", "gelu_tanh", True)],
)
def test_mlp_matches_naive(dtype, kind, act, bias):
    B, T, d, hid = 2, 5, 16, 24
    x = torch.randn(B, T, d, dtype=dtype, generator=torch.Generator().manual_seed(31))
    w_in, b_in, w_out, b_out = _mlp_weights(kind, d, hid, dtype, 37, bias)
    keep_l = _levels_table(MLP, B, T, seed=9)
    bits_l = _levels_table(BITS, B, T, seed=10)
    got = R.mlp(x, torch.tensor(keep_l, dtype=torch.float64), torch.tensor(bits_l, dtype=torch.float64),
                w_in, b_in, w_out, b_out, kind, act)
    want = naive_mlp(x.reshape(-1, d), [l for r in keep_l for l in r], [b for r in bits_l for b in r],
                     w_in, b_in, w_out, b_out, kind, act).reshape(B, T, d)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, **TOL[dtype])


class _Gated(nn.Module):
    def __init__(self, d, hid, bias):
        super().__init__()
        self.gate_proj, self.up_proj = nn.Linear(d, hid, bias=bias), nn.Linear(d, hid, bias=bias)
        self.down_proj = nn.Linear(hid, d, bias=bias)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Fused(nn.Module):  # Phi-3
    def __init__(self, d, hid):
        super().__init__()
        self.gate_up_proj, self.down_proj = nn.Linear(d, 2 * hid, bias=False), nn.Linear(hid, d, bias=False)

    def forward(self, x):
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(up * F.silu(gate))


class _Plain(nn.Module):  # GPT-2 style
    def __init__(self, d, hid):
        super().__init__()
        self.c_fc, self.c_proj = nn.Linear(d, hid), nn.Linear(hid, d)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))


def test_mlp_dense_is_bit_exact_with_nn_linear():
    torch.manual_seed(41)
    d, hid = 32, 48
    x = torch.randn(3, 7, d)
    keep, bits = torch.ones(3, 7, dtype=torch.float64), torch.full((3, 7), 16.0, dtype=torch.float64)
    m = _Gated(d, hid, bias=False)
    got = R.mlp(x, keep, bits, [m.gate_proj.weight, m.up_proj.weight], [None, None], m.down_proj.weight, None,
                "gated", "silu")
    assert torch.equal(got, m(x))
    m = _Gated(d, hid, bias=True)
    got = R.mlp(x, keep, bits, [m.gate_proj.weight, m.up_proj.weight], [m.gate_proj.bias, m.up_proj.bias],
                m.down_proj.weight, m.down_proj.bias, "gated", "silu")
    assert torch.equal(got, m(x))
    m = _Fused(d, hid)
    got = R.mlp(x, keep, bits, [m.gate_up_proj.weight], [None], m.down_proj.weight, None, "gated_fused", "silu")
    assert torch.equal(got, m(x))
    m = _Plain(d, hid)
    got = R.mlp(x, keep, bits, [m.c_fc.weight], [m.c_fc.bias], m.c_proj.weight, m.c_proj.bias, "plain", "gelu_tanh")
    assert torch.equal(got, m(x))


def test_mlp_unknown_kind_or_act():
    x = torch.randn(2, 4)
    w = [torch.randn(6, 4)]
    with pytest.raises(ValueError) as e:
        R.mlp(x, torch.ones(2), torch.full((2,), 16), w, [None], torch.randn(4, 6), None, "swiglu", "silu")
    assert "'swiglu'" in str(e.value) and all(k in str(e.value) for k in R.MLP_KINDS)
    with pytest.raises(ValueError) as e:
        R.mlp(x, torch.ones(2), torch.full((2,), 16), w, [None], torch.randn(4, 6), None, "plain", "tanh")
    assert "'tanh'" in str(e.value) and all(a in str(e.value) for a in R.ACTIVATIONS)
    with pytest.raises(ValueError, match="gated"):
        R.mlp(x, torch.ones(2), torch.full((2,), 16), w, [None], torch.randn(4, 6), None, "gated", "silu")


def test_exports():
    assert R.PAGE_SIZE == 8
    assert set(R.MLP_KINDS) == {"gated", "gated_fused", "plain"}
    assert set(R.ACTIVATIONS) == {"silu", "gelu", "gelu_tanh", "relu"}
