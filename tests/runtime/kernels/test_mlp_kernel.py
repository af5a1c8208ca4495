"""Sparse (column-skipping) MLP kernels vs reference.mlp / prune_mlp_input, under the interpreter."""
import pytest
import torch

from runtime.kernels import mlp as K
from runtime.ops import reference as ref

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
       torch.float16: dict(atol=4e-3, rtol=4e-3)}
KEEPS = [0.1, 0.5, 1.0, 0.3, 0.05, 0.9, 0.6, 0.7, 0.4, 0.8, 0.25, 0.15, 0.45, 0.55, 0.65, 0.75, 0.85, 0.95, 0.2, 0.35]


def _site(kind, d, f, dtype, bias, seed):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=1.0):
        return (torch.randn(*shape, generator=g) * s).to(dtype)

    if kind == "gated":
        w_in = [r(f, d, s=d ** -0.5), r(f, d, s=d ** -0.5)]
        b_in = [r(f), None] if bias else [None, None]
    else:
        n = 2 * f if kind == "gated_fused" else f
        w_in, b_in = [r(n, d, s=d ** -0.5)], [r(n) if bias else None]
    return w_in, b_in, r(d, f, s=f ** -0.5), r(d) if bias else None


def _hidden_ref(x, keep, w_in, b_in, kind, act):
    """h = act(gate) * up of the pruned input, as reference.mlp computes it (float32 for comparison)."""
    fn = ref._activation(act)
    xp = ref.prune_mlp_input(x.float(), keep)
    w, b = [t.float() for t in w_in], [t.float() if t is not None else None for t in b_in]
    if kind == "gated":
        return fn(torch.nn.functional.linear(xp, w[0], b[0])) * torch.nn.functional.linear(xp, w[1], b[1])
    if kind == "gated_fused":
        gate, up = torch.nn.functional.linear(xp, w[0], b[0]).chunk(2, dim=-1)
        return fn(gate) * up
    return fn(torch.nn.functional.linear(xp, w[0], b[0]))


@pytest.mark.parametrize("rows", [1, 5])
def test_select_matches_prune_mlp_input_with_ties(rows):
    g = torch.Generator().manual_seed(2)
    # values from {+-1, +-2, +-3}: many ties at the threshold (stable rule: lower channel wins), no zeros
    x = (torch.randint(1, 4, (rows, 29), generator=g) * (torch.randint(0, 2, (rows, 29), generator=g) * 2 - 1)).float()
    keep = torch.tensor(KEEPS[:rows], dtype=torch.float64)
    xp, idx, lens = K.select_channels(x, keep, group=K.next_pow2(rows))
    expected = ref.prune_mlp_input(x, keep)
    assert torch.equal(xp, expected)
    union = (expected != 0).any(0).nonzero().flatten()
    assert int(lens[0]) == union.numel()
    assert torch.equal(idx[0, : union.numel()].long(), union)


@pytest.mark.parametrize(
    "kind,act,dtype,rows,split_k,bias",
    [
        ("gated", "silu", torch.float32, 1, 1, True),
        ("gated_fused", "gelu", torch.float32, 3, 3, True),
        ("plain", "gelu_tanh", torch.bfloat16, 11, 2, True),  # 11 rows: the tl.dot path (16-row block)
        ("gated", "relu", torch.float16, 2, 1, False),
        ("gated", "silu", torch.bfloat16, 1, 2, True),
        ("plain", "silu", torch.float32, 20, 1, False),  # two row groups (16 + 4)
    ],
)
def test_sparse_mlp_matches_reference(kind, act, dtype, rows, split_k, bias):
    d, f = 37, 21  # not multiples of any block size
    w_in, b_in, w_out, b_out = _site(kind, d, f, dtype, bias, seed=rows)
    x = torch.randn(rows, d, generator=torch.Generator().manual_seed(10 + rows)).to(dtype)
    keep = torch.tensor(KEEPS[:rows], dtype=torch.float64)
    weights = K.input_weights(w_in, b_in, kind)
    h = torch.full((rows, f), float("nan"), dtype=dtype)
    got_h = K.mlp_input_projection(x, keep, weights, act, split_k=split_k, block_n=16, out=h)
    assert got_h.data_ptr() == h.data_ptr() and not h.isnan().any()
    torch.testing.assert_close(got_h.float(), _hidden_ref(x, keep, w_in, b_in, kind, act), **TOL[dtype])

    bits = torch.full((rows,), 16.0, dtype=torch.float64)
    got = K.sparse_mlp(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, split_k=split_k)
    expected = ref.mlp(x, keep, bits, w_in, b_in, w_out, b_out, kind, act)
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


def test_sparse_mlp_with_quantized_output_leading_dims():
    """x [2, 2, d]; mixed bits: the kernel output differs from the reference at most by one quant step
    (a rounding flip of a value that the two MLPs compute 1e-7 apart)."""
    w_in, b_in, w_out, b_out = _site("gated", 24, 40, torch.float32, True, seed=7)
    x = torch.randn(2, 2, 24, generator=torch.Generator().manual_seed(8))
    keep = torch.tensor([[0.4, 1.0], [0.8, 0.1]], dtype=torch.float64)
    bits = torch.tensor([[5.0, 16.0], [7.0, 2.0]], dtype=torch.float64)
    got = K.sparse_mlp(x, keep, bits, w_in, b_in, w_out, b_out, "gated", "silu")
    expected = ref.mlp(x, keep, bits, w_in, b_in, w_out, b_out, "gated", "silu")
    dense = ref.mlp(x, keep, None, w_in, b_in, w_out, b_out, "gated", "silu")
    step = dense.abs().amax(-1, keepdim=True) / (2 ** (bits[..., None] - 1) - 1)
    assert ((got - expected).abs() <= step * 1.001 + 1e-6).all()
    torch.testing.assert_close(got[0, 1], expected[0, 1], **TOL[torch.float32])  # 16 bits: no quantizer


def test_transposed_weights_are_cached_and_rebuilt_after_in_place_change():
    w_in, b_in, _, _ = _site("gated", 16, 8, torch.float32, True, seed=3)
    a = K.input_weights(w_in, b_in, "gated")
    assert K.input_weights(w_in, b_in, "gated") is a
    assert torch.equal(a.wt, torch.cat(w_in).t()) and a.wt.is_contiguous()
    assert torch.equal(a.bias, torch.cat([b_in[0], torch.zeros(8)]))
    with torch.no_grad():
        w_in[1].mul_(2)
    b = K.input_weights(w_in, b_in, "gated")
    assert b is not a and torch.equal(b.wt[:, 8:], w_in[1].t())
