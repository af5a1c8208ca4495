"""The fused fake-quant kernel equals reference.fake_quant bit for bit (same input)."""
import pytest
import torch

from runtime.kernels.quant import fake_quant_rows
from runtime.ops import reference as ref

BITS = [2.0, 3.0, 5.0, 7.0, 8.0, 16.0, 4.0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_fake_quant_kernel_is_bit_exact(dtype):
    g = torch.Generator().manual_seed(0)
    y = (torch.randn(len(BITS), 37, generator=g) * 3).to(dtype)  # 37: not a multiple of the block (16)
    y[-1] = torch.linspace(-3.5, 3.5, 37).to(dtype)  # halfway cases at 4 bits: 0.5 steps of scale 0.5
    bits = torch.tensor(BITS, dtype=torch.float64)
    out = torch.full_like(y, float("nan"))
    got = fake_quant_rows(y, bits, out=out, block_n=16)
    assert got.data_ptr() == out.data_ptr()
    expected = ref.fake_quant(y, bits)
    assert torch.equal(got, expected)
    assert torch.equal(got[5], y[5])  # 16 bits: identity


def test_fake_quant_kernel_leading_dims_and_in_place():
    g = torch.Generator().manual_seed(1)
    y = torch.randn(2, 3, 20, generator=g)
    bits = torch.tensor([[5.0, 16.0, 7.0], [2.0, 8.0, 6.0]], dtype=torch.float64)
    expected = ref.fake_quant(y, bits)
    got = fake_quant_rows(y, bits, out=y)  # in place
    assert torch.equal(got, expected) and torch.equal(y, expected)
