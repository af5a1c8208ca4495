"""quant="weight": the copies are torchao's, and the reference computes x_bf16 @ dequant(W_b) per row."""
import pytest
import torch
import torch.nn.functional as F

from runtime import torchao_adapter
from runtime.ops import mlp_weights, reference
from runtime.ops import quant_primitives as qp
from tests.runtime.ops.mlp_sites import D, GROUP, call, make_site


def test_int8_copy_is_symmetric_per_channel_and_dequantizes_exactly():
    w = torch.randn(48, 64) * 0.1
    q, scale = torchao_adapter.quantize_int8(w)
    assert q.dtype == torch.int8 and scale.dtype == torch.bfloat16 and scale.shape == (48,)
    deq = qp.dequant_int8(q, scale, torch.float32)
    inside = q.abs() < 127  # the bf16-rounded scale may clamp a channel's largest weight
    step = scale.float()[:, None].expand_as(w)
    assert (deq - w).abs()[inside].le(step[inside] / 2 * (1 + 1e-6)).all()  # round to nearest
    assert (deq - w).abs().le(step).all()
    assert torch.equal(qp.int8_from_rows(qp.int8_rows(q)), q)


def test_int4_copy_round_trips_like_torchaos_own_dequantize():
    w = torch.randn(48, 128) * 0.1
    packed, sz = torchao_adapter.quantize_int4(w, 32)
    assert packed.shape == (48, 64) and sz.shape == (4, 48, 2)
    assert torch.equal(qp.dequant_int4(packed, sz, 32, torch.float32), torchao_adapter.dequantize_int4_reference(w, 32))


def test_int4_cpu_kernel_reads_the_same_values():
    w = torch.randn(64, 96) * 0.1
    packed, sz = torchao_adapter.quantize_int4(w, 32)
    x = torch.randn(3, 96).bfloat16()
    got = torch._weight_int4pack_mm_for_cpu(x, mlp_weights.pack_int4_for_cpu(packed), 32, sz)
    want = x.float() @ qp.dequant_int4(packed, sz, 32, torch.float32).t()
    torch.testing.assert_close(got.float(), want, rtol=1e-2, atol=1e-2)


def test_group_size_is_the_largest_dividing_every_in_dim():
    assert qp.int4_group_size([576, 1536]) == 64
    assert qp.int4_group_size([512, 2048]) == 128
    assert qp.int4_group_size([96, 64]) == 32
    with pytest.raises(ValueError, match=r"MLP in-dims \[48, 64\]: no supported int4 group size divides them all.*\[8, 16\]"):
        qp.int4_group_size([64, 48])


@pytest.mark.parametrize("kind", ["gated", "gated_fused", "plain"])
@pytest.mark.parametrize("bits", [4, 8])
def test_reference_is_bf16_activations_times_dequantized_weights(kind, bits):
    site = make_site(kind, bias=True)
    x = torch.randn(5, D)
    got = call(reference.mlp, x, None, torch.full((5,), float(bits), dtype=torch.float64), site, "weight")
    table = mlp_weights.unpack(site["packs"])
    wi, wo = reference.dequantized(table, bits, GROUP, torch.float32)
    xb = x.bfloat16().float()
    pre = (xb @ wi.t()).bfloat16().float() + reference._input_bias(site["b_in"], site["w_in"], kind)
    h = reference._hidden(pre, kind, reference._activation(site["act"]))
    want = (h.bfloat16().float() @ wo.t()).bfloat16().float() + site["b_out"]
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_pruning_composes_with_the_low_bit_copy():
    site = make_site("gated")
    x = torch.randn(4, D)
    keep = torch.tensor([0.4, 0.8, 1.0, 0.4], dtype=torch.float64)
    bits = torch.tensor([8.0, 4.0, 8.0, 16.0], dtype=torch.float64)
    got = call(reference.mlp, x, keep, bits, site, "weight")
    xp = reference.prune_mlp_input(x, keep)
    for i in range(4):  # each row == the same row alone at its level, on its pruned input
        alone = call(reference.mlp, xp[i:i + 1], None, bits[i:i + 1], site, "weight")
        assert torch.equal(got[i:i + 1], alone)
    dense_row = F.linear(F.silu(F.linear(xp[3], site["w_in"][0])) * F.linear(xp[3], site["w_in"][1]), site["w_out"])
    assert torch.equal(got[3], dense_row)


def test_weight_mode_at_16_bits_is_the_dense_module():
    site = make_site("gated")
    x = torch.randn(3, D)
    sixteen = torch.full((3,), 16.0, dtype=torch.float64)
    assert torch.equal(call(reference.mlp, x, None, sixteen, site, "weight"),
                       reference.mlp(x, None, None, site["w_in"], site["b_in"], site["w_out"], None, "gated", "silu"))


def test_missing_copy_is_a_clear_error():
    site = make_site("gated", bits=(8,))
    with pytest.raises(ValueError, match="no int4 weight copies"):
        call(reference.mlp, torch.randn(2, D), None, torch.full((2,), 4.0, dtype=torch.float64), site, "weight")
