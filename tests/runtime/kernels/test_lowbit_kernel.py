"""The weight-only int8 / int4 Triton kernels (runtime.kernels.lowbit) against their definition,
x_bf16 @ dequant(W)^T rounded to bf16, and the CUDA entry point of solc::mlp in weight mode against
reference.mlp (under the interpreter, on CPU tensors)."""
import pytest
import torch

from runtime.kernels import lowbit, register
from runtime.kernels.mlp import select_channels
from runtime.ops import quant_primitives as qp
from runtime.ops import reference as ref
from runtime.ops.step_hints import StepHints, step_hints
from tests.runtime.ops.mlp_sites import call, make_site

K, N, GROUP = 64, 48, 32  # N: not a multiple of the 32 / 64-wide output blocks


def _bf16_ulps(got, want):
    """|got - want| in bf16 ulps of want's row maximum (2^-8 relative)."""
    return ((got - want).abs() / (want.abs().amax(-1, keepdim=True) * 2.0 ** -8)).max().item()


def _on_bf16_grid(t):
    return torch.equal(t, qp.to_bf16_grid(t, torch.float32))


def _weights(seed=0):
    from runtime import torchao_adapter

    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g) * 0.2
    q8, s8 = torchao_adapter.quantize_int8(w)
    q4, sz4 = torchao_adapter.quantize_int4(w, GROUP)
    return q8, s8, q4, sz4


@pytest.mark.parametrize("rows", [1, 3, 16])
def test_int8_and_int4_linears_match_their_definition(rows):
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, K, generator=g)
    q8, s8, q4, sz4 = _weights()
    xb = qp.to_bf16_grid(x, torch.float32)
    for fmt, q, meta, deq in ((lowbit.FMT_INT8, q8, s8, qp.dequant_int8(q8, s8, torch.float32)),
                              (lowbit.FMT_INT4, q4, sz4, qp.dequant_int4(q4, sz4, GROUP, torch.float32))):
        got = lowbit.lowbit_linear(x, fmt, q, meta, N, group_size=GROUP)
        want = qp.to_bf16_grid(xb @ deq.t(), torch.float32)
        assert got.shape == (rows, N) and _on_bf16_grid(got)
        assert _bf16_ulps(got, want) <= 1.0, fmt


def test_int4_nibbles_and_groups_are_read_exactly():
    """x one-hot on channel c: the output is the dequantized weight column c itself (one product, no
    sum), so every nibble, scale and zero must be the right one, bit for bit."""
    _, _, q4, sz4 = _weights(1)
    deq = qp.dequant_int4(q4, sz4, GROUP, torch.float32)
    x = torch.eye(K)[:16]  # channels 0..15: even and odd nibbles, the first group
    x2 = torch.eye(K)[K - 16:]  # the last group
    for rows in (x, x2):
        got = lowbit.lowbit_linear(rows, lowbit.FMT_INT4, q4, sz4, N, group_size=GROUP)
        assert torch.equal(got, qp.to_bf16_grid(rows @ deq.t(), torch.float32))


def test_the_input_is_rounded_to_bf16_before_it_multiplies():
    """x = [1 + 2^-8 + 2^-12, -1] against weights of exactly 1: rounded to bf16 first, the sum is 2^-7;
    unrounded it would be 2^-8 + 2^-12 (the cancellation shows the input's rounding)."""
    x = torch.zeros(2, K)
    x[:, 0], x[:, 1] = 1 + 2.0 ** -8 + 2.0 ** -12, -1.0
    q8 = torch.ones(N, K, dtype=torch.int8)
    s8 = torch.ones(N, dtype=torch.bfloat16)
    q4 = qp.pack_nibbles(torch.full((N, K), 9))  # (9 - 8) * 1 + 0 = 1
    sz4 = torch.stack([torch.ones(K // GROUP, N), torch.zeros(K // GROUP, N)], -1).to(torch.bfloat16)
    keep = torch.full((2,), 0.05, dtype=torch.float64)  # keeps channels 0 and 1 (4 of 64, the largest |x|)
    _, idx, lens = select_channels(x, keep, 2)
    for got in (lowbit.lowbit_linear(x, lowbit.FMT_INT8, q8, s8, N),
                lowbit.lowbit_linear(x, lowbit.FMT_INT4, q4, sz4, N, group_size=GROUP),
                lowbit.lowbit_linear(x, lowbit.FMT_INT8_ROWS, qp.int8_rows(q8), s8, N, idx=idx, lens=lens)):
        assert torch.equal(got, torch.full((2, N), 2.0 ** -7))


@pytest.mark.parametrize("rows", [1, 5])
def test_int8_row_form_reads_only_the_kept_channels(rows):
    """The column-skipping int8 form over select_channels' lists equals the dense int8 kernel on the
    pruned input; poisoning the dropped channels' rows in the row copy changes nothing."""
    g = torch.Generator().manual_seed(7)
    x = torch.randn(rows, K, generator=g)
    keep = torch.tensor([0.4, 0.25, 0.9, 0.1, 0.6][:rows], dtype=torch.float64)
    q8, s8, _, _ = _weights(2)
    block_m = lowbit._blocks(rows)[0]
    xp, idx, lens = select_channels(x, keep, block_m)
    assert torch.equal(xp, ref.prune_mlp_input(x, keep))
    rows_form = qp.int8_rows(q8)
    union = (xp != 0).any(0)
    poisoned = rows_form.clone()
    poisoned[~union, :-8] = 255  # a dropped channel's weights read as 127: visible if they were summed
    got = lowbit.lowbit_linear(xp, lowbit.FMT_INT8_ROWS, poisoned, s8, N, idx=idx, lens=lens)
    dense = lowbit.lowbit_linear(xp, lowbit.FMT_INT8, q8, s8, N)
    want = qp.to_bf16_grid(qp.to_bf16_grid(xp, torch.float32) @ qp.dequant_int8(q8, s8, torch.float32).t(), torch.float32)
    assert _bf16_ulps(got, want) <= 1.0 and _bf16_ulps(dense, want) <= 1.0


def test_lowbit_linear_rejects_bad_int4_shapes_and_a_missing_list():
    q8, s8, q4, sz4 = _weights()
    x = torch.randn(1, K)
    with pytest.raises(ValueError, match="group_size"):
        lowbit.lowbit_linear(x, lowbit.FMT_INT4, q4, sz4, N, group_size=48)
    with pytest.raises(ValueError, match="idx and lens"):
        lowbit.lowbit_linear(x, lowbit.FMT_INT8_ROWS, qp.int8_rows(q8), s8, N)


def _mlp_close(got, want):
    """Low-bit rows: a rounded intermediate may move by one bf16 ulp, which the down projection spreads
    over the row: 4 ulps of the row's largest output (the CPU fast paths' bound, tests/runtime/ops)."""
    got, want = got.float(), want.float()
    bound = want.abs().amax(-1, keepdim=True) * 2.0 ** -6
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("keep", [0.4, 1.0])
@pytest.mark.parametrize("kind,bias,dtype,rows", [("gated", False, torch.float32, 1),
                                                   ("gated_fused", True, torch.bfloat16, 5),
                                                   ("plain", True, torch.float32, 16)])
def test_cuda_entry_point_runs_the_lowbit_kernels_for_a_known_level(bits, keep, kind, bias, dtype, rows, monkeypatch):
    site = make_site(kind, dtype=dtype, bias=bias, seed=bits)
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 64, generator=g)).to(dtype)
    keep_t = torch.full((rows,), keep, dtype=torch.float64)
    bits_t = torch.full((rows,), float(bits), dtype=torch.float64)
    ran = []
    real = lowbit.lowbit_mlp
    monkeypatch.setattr(lowbit, "lowbit_mlp", lambda *a, **k: ran.append(k["prune"]) or real(*a, **k))
    with step_hints(StepHints(attn=1.0, mlp=keep, bits=bits)):
        got = call(register._mlp_cuda, x, keep_t, bits_t, site, "weight")
    assert ran == [keep < 1.0]  # the kernels ran; a dense mlp level skips the channel selection
    want = call(ref.mlp, x, keep_t, bits_t, site, "weight")
    assert got.dtype == want.dtype and got.shape == want.shape
    _mlp_close(got, want)


def test_cuda_entry_point_without_a_known_level_runs_the_reference(monkeypatch):
    """Mixed levels (the generic step), more than 16 rows, or a level without copies: the reference."""
    site = make_site("gated", seed=3, bits=(8,))
    x = torch.randn(17, 64)
    keep = torch.full((17,), 0.4, dtype=torch.float64)
    monkeypatch.setattr(lowbit, "lowbit_mlp", lambda *a, **k: pytest.fail("the low-bit kernels ran"))
    mixed = torch.tensor([8.0, 16.0] * 8 + [8.0], dtype=torch.float64)
    assert torch.equal(call(register._mlp_cuda, x, keep, mixed, site, "weight"), call(ref.mlp, x, keep, mixed, site, "weight"))
    eights = torch.full((17,), 8.0, dtype=torch.float64)
    with step_hints(StepHints(mlp=0.4, bits=8)):
        assert torch.equal(call(register._mlp_cuda, x, keep, eights, site, "weight"),
                           call(ref.mlp, x, keep, eights, site, "weight"))
    fours = torch.full((3,), 4.0, dtype=torch.float64)
    assert not lowbit.has_copies(site["packs"], 4)
    with step_hints(StepHints(mlp=0.4, bits=4)), pytest.raises(ValueError, match="no int4 weight copies"):
        call(register._mlp_cuda, x[:3], keep[:3], fours, site, "weight")


def test_has_copies_names_each_level():
    site = make_site("plain", seed=0, bits=(4,))
    assert lowbit.has_copies(site["packs"], 4) and not lowbit.has_copies(site["packs"], 8)
    assert not lowbit.has_copies([], 8) and not lowbit.has_copies(site["packs"], 16)
