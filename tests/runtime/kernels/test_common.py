"""The in-kernel keep count equals reference.keep_count, including float32-rounded levels."""
import torch
import triton
import triton.language as tl

from runtime.kernels._common import keep_count
from runtime.ops import reference as ref


@triton.jit
def _keep_count_kernel(keep_ptr, n_ptr, out_ptr, N, BLOCK: tl.constexpr):
    i = tl.arange(0, BLOCK)
    m = i < N
    keep = tl.load(keep_ptr + i, mask=m, other=1.0)
    n = tl.load(n_ptr + i, mask=m, other=1)
    tl.store(out_ptr + i, keep_count(keep, n), mask=m)


def test_keep_count_kernel_equals_reference():
    levels = [0.1, 0.6, 0.4, 0.8, 1.0, 0.35, 1e-7, 0.0000125, 0.5, 0.05, 0.999999, 0.3333333]
    levels += [float(torch.tensor(v, dtype=torch.float32)) for v in levels]  # 0.6 as float32 = 0.60000002
    ns = [1, 7, 8, 10, 45, 576, 2048, 14336, 32769]
    keep = torch.tensor([k for k in levels for _ in ns], dtype=torch.float64)
    n = torch.tensor([v for _ in levels for v in ns], dtype=torch.int64)
    out = torch.full_like(n, -1)
    _keep_count_kernel[(1,)](keep, n, out, keep.numel(), BLOCK=triton.next_power_of_2(keep.numel()))
    assert torch.equal(out, ref.keep_count(keep, n))
