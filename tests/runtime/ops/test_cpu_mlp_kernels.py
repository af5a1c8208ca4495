"""The kernels behind solc::mlp's CPU paths (runtime/ops/cpu_mlp.py, cpu_mlp.c): each equals its
definition, a row's bits do not depend on its batch mates or the thread count, and without a compiler
torch's int8 kernel runs instead."""
import pytest
import torch

from runtime.ops import cpu_linear, cpu_mlp, quant_primitives as qp, reference

SHAPES = [(64, 96), (70, 45), (576, 3072)]  # (K, N): K with and without a tail past the 16-lane sums


def _data(K, N, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, K, generator=g)
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    scale = (torch.rand(N, generator=g) * 0.02 + 0.001).to(torch.bfloat16)
    wt = torch.randn(K, N, generator=g)
    return x, q, scale, wt


def _bf16_ulps(got, want):
    """|got - want| in bf16 ulps of want's row maximum (2^-8 relative)."""
    return ((got - want).abs() / (want.abs().amax(-1, keepdim=True) * 2.0 ** -8)).max().item()


def _threads(n):
    class _Set:
        def __enter__(self):
            self.old = torch.get_num_threads()
            torch.set_num_threads(n)

        def __exit__(self, *exc):
            torch.set_num_threads(self.old)
    return _Set()


@pytest.mark.parametrize("K,N", SHAPES)
def test_int8_linear_is_the_reference_and_row_independent(K, N):
    x, q, scale, _ = _data(K, N, rows=16)
    want = qp.to_bf16_grid(qp.to_bf16_grid(x, torch.float32) @ qp.dequant_int8(q, scale, torch.float32).t(),
                           torch.float32)
    got = cpu_mlp._int8_linear(x, q, scale)
    assert got.dtype == torch.float32 and torch.equal(got, qp.to_bf16_grid(got, torch.float32))  # on the bf16 grid
    assert _bf16_ulps(got, want) <= 1.0
    alone = torch.cat([cpu_mlp._int8_linear(x[i:i + 1], q, scale) for i in range(16)])
    assert torch.equal(got, alone)
    with _threads(1):
        assert torch.equal(cpu_mlp._int8_linear(x, q, scale), got)


@pytest.mark.parametrize("K,N", SHAPES)
@pytest.mark.parametrize("keep", [0.4, 0.6])
def test_row_skipping_gemv_is_the_pruned_product_and_row_independent(K, N, keep):
    x, _, _, wt = _data(K, N, rows=5, seed=1)
    kept = cpu_mlp._pruned(x, [keep] * 5)
    got = cpu_mlp._rowskip(x, [keep] * 5, wt)
    # fp32 summation-order error bound: 2 n u sum|x_j w_j| over the n kept terms (u = 2^-24)
    n = int((kept != 0).sum(-1).max())
    assert ((got - kept @ wt).abs() <= 2 * n * 2.0 ** -24 * (kept.abs() @ wt.abs())).all()
    alone = torch.cat([cpu_mlp._rowskip(x[i:i + 1], [keep], wt) for i in range(5)])
    assert torch.equal(got, alone)
    mixed = cpu_mlp._rowskip(x, [keep, 0.4, 0.6, keep, 0.5], wt)  # own keep per row
    assert torch.equal(mixed[0], got[0]) and torch.equal(mixed[3], got[3])
    with _threads(1):
        assert torch.equal(cpu_mlp._rowskip(x, [keep] * 5, wt), got)


@pytest.mark.parametrize("K,N", SHAPES)
def test_int8_row_skipping_gemv_is_the_pruned_low_bit_product(K, N):
    x, q, scale, _ = _data(K, N, rows=4, seed=2)
    rows = qp.int8_rows(q)
    got = cpu_mlp._rowskip_int8(x, [0.4] * 4, rows, scale)
    pruned = qp.to_bf16_grid(cpu_mlp._pruned(x, [0.4] * 4), torch.float32)
    defined = qp.to_bf16_grid(pruned @ qp.dequant_int8(q, scale, torch.float32).t(), torch.float32)
    assert _bf16_ulps(got, defined) <= 1.0
    assert torch.equal(got, torch.cat([cpu_mlp._rowskip_int8(x[i:i + 1], [0.4], rows, scale) for i in range(4)]))


@pytest.mark.parametrize("K,N", SHAPES)
def test_int8_row_kernel_is_one_ascending_chain_per_output(K, N):
    """cpu_mlp.c's int8 row kernel sums each output as s = fmaf(x_k, q_k, s) over the row's kept channels
    in ascending k (x on the bf16 grid, so every product is exact in fp32 and fmaf is an fp32 add of it):
    the same bits as that loop in torch, at batch 1 and inside a batch of mixed keeps, at any thread count;
    the dense pass (every channel) is the loop over all k."""
    if cpu_linear.library() is None:
        pytest.skip("no C compiler")
    x, q, scale, _ = _data(K, N, rows=3, seed=4)
    rows = qp.int8_rows(q)
    keeps = [0.4, 1.0, 0.8]
    xb = qp.to_bf16_grid(x, torch.float32)
    qf = q.float().t()  # [K, N]
    flat, offsets = cpu_mlp._kept(x, keeps)

    def chain(r, ks):
        s = torch.zeros(N)
        for k in ks:
            s = s + xb[r, k] * qf[k]  # the product is exact: one fp32 rounding per step, as fmaf
        return qp.to_bf16_grid(s * scale.float(), torch.float32)

    want = torch.stack([chain(r, flat[offsets[r]:offsets[r + 1]].tolist()) for r in range(3)])
    for threads in (1, 2, 3):
        with _threads(threads):
            assert torch.equal(cpu_mlp._rowskip_int8(x, keeps, rows, scale), want)
            assert torch.equal(cpu_mlp._rowskip_int8(x[:1], keeps[:1], rows, scale), want[:1])
            assert torch.equal(cpu_mlp._int8_rows_linear(x, rows, scale),
                               torch.stack([chain(r, range(K)) for r in range(3)]))


def test_without_a_compiler_the_torch_kernels_run(monkeypatch):
    x, q, scale, _ = _data(64, 96, rows=3, seed=3)
    monkeypatch.setattr(cpu_linear, "library", lambda: None)
    assert torch.equal(cpu_mlp._int8_linear(x, q, scale), torch._weight_int8pack_mm(x.bfloat16(), q, scale).float())


def test_bags_hold_each_rows_kept_channels_in_ascending_order():
    x = torch.tensor([[0.1, -3.0, 2.0, 0.5], [4.0, 0.2, -0.3, 1.0]])
    flat, offsets, weights = cpu_mlp._bags(x, [0.5, 0.5])
    assert flat.tolist() == [1, 2, 0, 3] and offsets.tolist() == [0, 2, 4]
    assert weights.tolist() == [-3.0, 2.0, 4.0, 1.0]
    flat, offsets, _ = cpu_mlp._bags(x, [0.25, 0.75])
    assert flat.tolist() == [1, 0, 2, 3] and offsets.tolist() == [0, 1, 4]


@pytest.mark.parametrize("d", [8, 100, 576])
def test_c_channel_selection_is_the_references_set_with_ties(d):
    """cpu_mlp.c's selection keeps the reference's channels (largest |x|, ties to the lower index), in
    ascending order, each row its own count: integer-valued rows tie at almost every cut."""
    if cpu_linear.library() is None:
        pytest.skip("no C compiler")
    g = torch.Generator().manual_seed(d)
    x = torch.randint(-4, 5, (6, d), generator=g).float()
    x[1] = torch.randn(d, generator=g)  # no ties
    keeps = [0.4, 0.8, 0.1, 1.0, 0.55, 1 / d]
    flat, offsets = cpu_mlp._kept(x, keeps)
    for i, keep in enumerate(keeps):
        got = flat[offsets[i]:offsets[i + 1]]
        k = reference.keep_count(keep, d)  # the reference's rule: a stable descending sort of |x|
        want = torch.sort(x[i].abs(), descending=True, stable=True).indices[:k].sort().values
        assert torch.equal(got, want), i
        assert torch.equal(reference.prune_mlp_input(x[i:i + 1], keep)[0].nonzero()[:, 0],
                           want[x[i, want] != 0])  # and prune_mlp_input keeps exactly those


@pytest.mark.parametrize("K,N,group", [(576, 3072, 64), (1536, 576, 64), (256, 96, 128), (64, 48, 32)])
def test_int4_linear_is_the_reference_and_row_independent(K, N, group):
    """The int4 linear (cpu_mlp.c on AVX-512 BF16 CPUs, torch's kernel elsewhere)
    against its definition, x_bf16 @ dequant_int4(W)^T rounded to bf16: within one bf16 ulp of the row
    maximum; a row's bits do not depend on its batch mates or the thread count."""
    from runtime import torchao_adapter
    from runtime.ops import mlp_weights

    g = torch.Generator().manual_seed(K + N)
    w = torch.randn(N, K, generator=g) * 0.05
    packed, sz = torchao_adapter.quantize_int4(w, group)
    c = {"in4": packed, "in4_sz": sz, "in4_cpu": mlp_weights.pack_int4_for_cpu(packed)}
    x = torch.randn(16, K, generator=g) * 3
    want = qp.to_bf16_grid(qp.to_bf16_grid(x, torch.float32) @ qp.dequant_int4(packed, sz, group, torch.float32).t(),
                           torch.float32)
    got = cpu_mlp._int4_linear(x, c, "in4", group)
    assert got.dtype == torch.float32 and torch.equal(got, qp.to_bf16_grid(got, torch.float32))
    assert _bf16_ulps(got, want) <= 1.0
    assert (got == want).float().mean() > 0.99  # the same sum: only rare roundings differ
    assert torch.equal(torch.cat([cpu_mlp._int4_linear(x[i:i + 1], c, "in4", group) for i in range(16)]), got)
    with _threads(1):
        assert torch.equal(cpu_mlp._int4_linear(x, c, "in4", group), got)


@pytest.mark.skipif(not cpu_mlp.int4_kernel(), reason="cpu_mlp.c's int4 linear needs AVX-512 BF16")
@pytest.mark.parametrize("K,N,group", [(576, 3072, 64), (1536, 576, 64), (256, 53, 128), (64, 45, 32), (40, 21, 8)])
def test_int4_linear_over_a_packed_copy_gives_the_per_call_bits(monkeypatch, K, N, group):
    """The int4 copy packed in stream order (cpu_mlp.c's solc_pack_i4: per 16 rows, each group's 64-byte
    slices of 16 rows x 8 channels, then its scales; the last N % 16 rows built per call) gives every row
    the bits that building each block's stream per call from the nibble copy gives, at 1 and 2 threads;
    each of 7 rows (run 4, 2 and 1 at a time) alone gives its bits in the batch; both are the reference
    within one bf16 ulp. Scales changed in place are packed anew."""
    from runtime import torchao_adapter

    g = torch.Generator().manual_seed(K * N)
    w = torch.randn(N, K, generator=g) * 0.05
    packed, sz = torchao_adapter.quantize_int4(w, group)
    c = {"in4": packed, "in4_sz": sz, "in4_cpu": None}  # torch's kernel is never the one that runs here
    x = torch.randn(7, K, generator=g) * 3
    key = (packed.data_ptr(), N, K // 2)
    monkeypatch.setenv("SOLC_CPU_PACK", "0")
    in_place = cpu_mlp._int4_linear(x, c, "in4", group)
    assert key not in cpu_linear._packed
    want = qp.to_bf16_grid(qp.to_bf16_grid(x, torch.float32) @ qp.dequant_int4(packed, sz, group, torch.float32).t(),
                           torch.float32)
    assert _bf16_ulps(in_place, want) <= 1.0 and (in_place == want).float().mean() > 0.99
    monkeypatch.setenv("SOLC_CPU_PACK", "1")
    for threads in (1, 2):
        with _threads(threads):
            assert torch.equal(cpu_mlp._int4_linear(x, c, "in4", group), in_place)
            assert key in cpu_linear._packed
            assert torch.equal(torch.cat([cpu_mlp._int4_linear(x[i:i + 1], c, "in4", group) for i in range(7)]),
                               in_place)
    sz.mul_(2)  # scales and zeros doubled: so is every output (a power of two: the same roundings)
    assert torch.equal(cpu_mlp._int4_linear(x, c, "in4", group), 2 * in_place)


@pytest.mark.skipif(not cpu_mlp.int4_kernel(), reason="cpu_mlp.c's int4 linear needs AVX-512 BF16")
def test_int4_linear_rounds_x_to_bf16_ties_to_even():
    """x is rounded to bf16 as torch rounds it (ties to even, NaN kept) before the sums: with every weight
    at zero point 1 (q = 8) an output is the plain sum of the rounded x, which tells the roundings apart."""
    K, N, group = 128, 32, 64
    packed = torch.full((N, K // 2), 0x88, dtype=torch.uint8)
    sz = torch.ones(K // group, N, 2, dtype=torch.bfloat16)  # scale 1, zero 1: w = (8 - 8) * 1 + 1
    c = {"in4": packed, "in4_sz": sz, "in4_cpu": None}
    tie_down, tie_up = 1 + 2 ** -8, 1 + 3 * 2 ** -8  # halfway: to 1.0 and to 1 + 2^-6 (the even neighbours)
    x = torch.tensor([[tie_down] * K, [tie_up] * K, [-tie_up] * K, [1.0] * (K - 1) + [float("nan")]])
    got = cpu_mlp._int4_linear(x, c, "in4", group)
    want = qp.to_bf16_grid(x, torch.float32).sum(1, keepdim=True).expand(4, N)
    assert torch.equal(got[:3], want[:3]) and got[0, 0] == K and got[1, 0] == K * (1 + 2 ** -6)
    assert got[3].isnan().all()


def test_int4_kernel_runs_where_the_cpu_has_avx512_bf16():
    """The C int4 kernel is what runs on a CPU with AVX-512 BF16 (not silently torch's), and nowhere else."""
    flags = set(cpu_linear._cpu_features().split())
    if cpu_linear.library() is None:
        pytest.skip("no C compiler")
    assert cpu_mlp.int4_kernel() == ({"avx512f", "avx512bw", "avx512_bf16"} <= flags)


@pytest.mark.skipif(not (cpu_linear.library() and cpu_linear.library().solc_pack_supported()),
                    reason="the packed int8 GEMV needs an AVX-512 build")
@pytest.mark.parametrize("K,N", SHAPES)
def test_int8_linear_over_a_packed_copy_gives_the_same_bits(monkeypatch, K, N):
    """A batch-1 call packs the int8 copy (16 rows x 16 bytes per k step, cpu_linear.c's solc_pack_i8);
    the packed GEMV gives every row the bits the in-place one gives, at 1 and 2 threads."""
    x, q, scale, _ = _data(K, N, rows=3, seed=6)
    monkeypatch.setenv("SOLC_CPU_PACK", "0")
    in_place = [cpu_mlp._int8_linear(x[i:i + 1], q, scale) for i in range(3)]
    assert (q.data_ptr(), N, K) not in cpu_linear._packed
    monkeypatch.setenv("SOLC_CPU_PACK", "1")
    for threads in (1, 2):
        with _threads(threads):
            packed = [cpu_mlp._int8_linear(x[i:i + 1], q, scale) for i in range(3)]
        assert (q.data_ptr(), N, K) in cpu_linear._packed
        for a, p in zip(in_place, packed):
            assert torch.equal(a, p)
