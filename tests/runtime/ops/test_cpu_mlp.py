"""The CPU fast paths of solc::mlp == reference.mlp (invariant 2), and batch invariance in both modes."""
import itertools

import pytest
import torch

from runtime.ops import cpu_mlp, reference
from runtime.ops.step_hints import StepHints, step_hints
from tests.runtime.ops.mlp_sites import D, call, make_site

@pytest.fixture(autouse=True)
def _cpu_fast_paths_on(monkeypatch):
    monkeypatch.setenv("SOLC_CPU_FAST", "1")  # on by default; pinned in case the environment turned them off


KEEPS = (0.4, 0.8, 1.0)
BITS = {"weight": (4, 8, 16), "activation": (5, 7, 16)}
OP = torch.ops.solc.mlp.default


def _levels(rows, quant, seed):
    g = torch.Generator().manual_seed(seed)
    actions = list(itertools.product(KEEPS, BITS[quant]))
    pick = torch.randint(len(actions), (rows,), generator=g)
    keep = torch.tensor([actions[i][0] for i in pick], dtype=torch.float64)
    bits = torch.tensor([float(actions[i][1]) for i in pick], dtype=torch.float64)
    return keep, bits


def _close(got, want, dtype, quant, bits):
    """fp32 paths: summation order only (1e-5). Where bf16 roundings happen (bf16 models, low-bit rows),
    another summation order may move a rounded intermediate by one bf16 ulp (2^-8 relative), which the
    next projection spreads over the row: allow 4 ulps of the row's largest output."""
    got, want = got.float(), want.float()
    low_precision = dtype == torch.bfloat16 or (quant == "weight" and bool((bits < 16).any()))
    if not low_precision:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        return
    bound = want.abs().amax(-1, keepdim=True) * 2.0 ** -6
    assert ((got - want).abs() <= bound).all(), ((got - want).abs() / bound).max()


def _close_fake_quantized(got, want, dtype, bits):
    """Activation mode: the quantizer turns summation-order noise into at most one quantization step
    per element (plus the noise itself: 1e-5 in fp32, 4 bf16 ulps of the row maximum in bf16)."""
    got, want = got.float(), want.float()
    absmax = want.abs().amax(-1, keepdim=True)
    noise = absmax * 2.0 ** -6 if dtype == torch.bfloat16 else 1e-5 + 1e-5 * absmax
    step = torch.where(bits[:, None] < 16, absmax / (2 ** (bits[:, None] - 1) - 1), torch.zeros(()))
    assert ((got - want).abs() <= step * 1.001 + noise).all()


@pytest.mark.parametrize("row_skip_max", [cpu_mlp.ROW_SKIP_MAX_KEEP, 0.5], ids=["rule", "dense_at_0.8"])
@pytest.mark.parametrize("quant", ["weight", "activation"])
@pytest.mark.parametrize("kind,bias", [("gated", False), ("gated_fused", True), ("plain", True)])
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_mixed_levels_match_the_reference(quant, kind, bias, rows, dtype, row_skip_max, monkeypatch):
    """Every kernel of every level: with the rule, keep 0.8 row-skips at 16 bits (and at 8 bits, where any
    pruned row does); pinned lower, it runs the fp32 dense kernel on the pruned input."""
    assert cpu_mlp.row_skips(16, [0.8]) and cpu_mlp.row_skips(8, [0.8]) and cpu_mlp.row_skips(8, [1.0, 0.4])
    assert not cpu_mlp.row_skips(8, [1.0]) and not cpu_mlp.row_skips(16, [1.0, 0.4])
    monkeypatch.setattr(cpu_mlp, "ROW_SKIP_MAX_KEEP", row_skip_max)
    site = make_site(kind, dtype=dtype, bias=bias)
    x = torch.randn(rows, D).to(dtype)
    keep, bits = _levels(rows, quant, seed=rows)
    want = call(reference.mlp, x, keep, bits, site, quant)
    got = call(OP, x, keep, bits, site, quant)
    assert got.dtype == dtype and got.shape == want.shape
    if quant == "activation":
        _close_fake_quantized(got, want, dtype, bits)
    else:
        _close(got, want, dtype, quant, bits)


@pytest.mark.parametrize("quant", ["weight", "activation"])
@pytest.mark.parametrize("keep_level", KEEPS)
@pytest.mark.parametrize("bits_index", [0, 1, 2])
@pytest.mark.parametrize("rows", [1, 16])
def test_uniform_actions_with_and_without_hints_match_the_reference(quant, keep_level, bits_index, rows):
    bits_level = BITS[quant][bits_index]
    site = make_site("gated", seed=3)
    x = torch.randn(rows, 1, D)
    keep = torch.full((rows, 1), keep_level, dtype=torch.float64)
    bits = torch.full((rows, 1), float(bits_level), dtype=torch.float64)
    want = call(reference.mlp, x, keep, bits, site, quant)
    plain = call(OP, x, keep, bits, site, quant)
    with step_hints(StepHints(mlp=keep_level, bits=bits_level)):
        hinted = call(OP, x, keep, bits, site, quant)
    assert torch.equal(plain, hinted)  # hints pick the same path, they never change results
    if quant == "activation":
        _close_fake_quantized(plain, want, torch.float32, bits.reshape(rows))
    else:
        _close(plain, want, torch.float32, quant, bits)
    alone = call(OP, x[:1], keep[:1], bits[:1], site, quant)
    assert torch.equal(plain[:1], alone)  # DESIGN invariant 6: bit for bit, whatever the batch


def test_kept_channels_follow_the_reference_tie_rule():
    x = torch.tensor([[1.0, -3.0, 3.0, 0.5, -3.0, 2.0, 3.0, 0.0]])
    # |x| = 1 3 3 .5 3 2 3 0: keeping 3 of 8 must take the three LOWEST-index 3s (1, 2, 4), not 6
    got = sorted(cpu_mlp.kept_channels(x, 3 / 8).tolist()[0])
    pruned = reference.prune_mlp_input(x, 3 / 8)
    assert got == [1, 2, 4] == pruned[0].nonzero().squeeze(1).tolist()


def test_float64_runs_the_reference_and_decode_rows_beyond_16_run_in_calls_of_16():
    site = make_site("gated", dtype=torch.float64)
    x = torch.randn(3, D, dtype=torch.float64)
    keep, bits = _levels(3, "weight", seed=1)
    assert not cpu_mlp.applies(x, site["w_in"], site["b_in"], site["w_out"], site["b_out"], "weight")
    assert torch.equal(call(OP, x, keep, bits, site, "weight"), call(reference.mlp, x, keep, bits, site, "weight"))
    site32 = make_site("gated")
    for quant in ("weight", "activation"):
        x = torch.randn(37, 1, D)
        keep, bits = _levels(37, quant, seed=2)
        keep, bits = keep[:, None], bits[:, None]
        got = call(OP, x, keep, bits, site32, quant)
        one_by_one = torch.cat([call(OP, x[i:i + 1], keep[i:i + 1], bits[i:i + 1], site32, quant) for i in range(37)])
        assert torch.equal(got, one_by_one)  # each row as if alone
        want = call(reference.mlp, x, keep, bits, site32, quant)
        if quant == "activation":
            _close_fake_quantized(got[:, 0], want[:, 0], torch.float32, bits[:, 0])
        else:
            _close(got[:, 0], want[:, 0], torch.float32, quant, bits[:, 0])


def test_prefill_runs_the_reference_one_batch_row_at_a_time():
    site = make_site("gated", seed=4)
    x = torch.randn(3, 5, D)
    keep, bits = _levels(15, "weight", seed=3)
    keep, bits = keep.reshape(3, 5), bits.reshape(3, 5)
    got = call(OP, x, keep, bits, site, "weight")
    for i in range(3):
        assert torch.equal(got[i:i + 1], call(reference.mlp, x[i:i + 1], keep[i:i + 1], bits[i:i + 1], site, "weight"))


@pytest.mark.parametrize("quant", ["weight", "activation"])
@pytest.mark.parametrize("action", range(9))
def test_a_row_is_independent_of_its_batch(quant, action):
    """The same row alone, inside a batch of 4 with mates at other actions, and inside a batch at its own
    action gives the same output bit for bit (DESIGN invariant 6), at every level of both modes."""
    keep_level, bits_level = list(itertools.product(KEEPS, BITS[quant]))[action]
    site = make_site("gated", seed=5)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(4, D, generator=g)
    keep = torch.tensor([keep_level, 0.4, 1.0, 0.8], dtype=torch.float64)
    bits = torch.tensor([float(bits_level), *(float(b) for b in BITS[quant])], dtype=torch.float64)
    batch = call(OP, x, keep, bits, site, quant)
    alone = call(OP, x[:1], keep[:1], bits[:1], site, quant)
    same_action = call(OP, x, keep[:1].expand(4), bits[:1].expand(4), site, quant)
    assert torch.equal(batch[0], alone[0]) and torch.equal(same_action[0], alone[0])


def test_int8_row_skip_selects_channels_before_rounding_to_bf16():
    """Two channels that differ in fp32 but round to the same bf16 value: the reference keeps the larger."""
    site = make_site("gated", seed=9)
    x = torch.full((1, D), 0.01)
    x[0, 5] = 1.0 + 2.0 ** -10  # rounds to 1.0 in bf16
    x[0, 3] = 1.0               # lower index: wins a bf16 tie, loses the fp32 comparison
    keep = torch.tensor([1 / D], dtype=torch.float64)  # keep exactly one channel
    bits = torch.tensor([8.0], dtype=torch.float64)
    assert cpu_mlp.kernel_of(1 / D, 8) == (8, True)
    got = call(OP, x, keep, bits, site, "weight")
    want = call(reference.mlp, x, keep, bits, site, "weight")
    _close(got, want, torch.float32, "weight", bits)


@pytest.mark.parametrize("rows", [1, 3])
def test_row_skip_gives_the_same_bits_for_any_thread_count(rows):
    """At batch 1 the threads split the output columns (cpu_mlp.c's column_chunk): each output is still
    summed over the row's kept channels in one order, so 1, 2 and 3 threads give the same bits; a column
    count that is not a multiple of 16 covers the last chunk's edge."""
    from runtime.ops import quant_primitives

    g = torch.Generator().manual_seed(11)
    d, n = 96, 16 * 7 + 5
    x = torch.randn(rows, d, generator=g)
    wt = torch.randn(d, n, generator=g)
    q = torch.randint(-127, 128, (n, d), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) + 0.5
    in8_rows = quant_primitives.int8_rows(q)
    keeps = [0.4, 0.7, 0.25][:rows]
    old = torch.get_num_threads()
    outs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append((cpu_mlp._rowskip(x, keeps, wt), cpu_mlp._rowskip_int8(x, keeps, in8_rows, scale)))
    finally:
        torch.set_num_threads(old)
    flat, offsets, weights = cpu_mlp._bags(x, keeps, None)
    want = torch.nn.functional.embedding_bag(flat, wt, offsets[:-1], mode="sum", per_sample_weights=weights)
    torch.testing.assert_close(outs[0][0], want, rtol=1e-5, atol=1e-5)  # the right sums, not just stable ones
    for f32, int8 in outs[1:]:
        assert torch.equal(f32, outs[0][0]) and torch.equal(int8, outs[0][1])


@pytest.mark.parametrize("rows", [1, 5])
# 100: four channels in the kernels' scalar tail; 576 (SmolLM2): 36 channels a lane, and these rows' lanes
# keep 1 to 33 channels each, so the fp32 kernel's lanes end in passes of 1, 2 and 3 rows after their
# four-row passes
@pytest.mark.parametrize("d", [96, 100, 576])
def test_row_skip_equals_the_dense_kernel_on_the_pruned_input_bit_for_bit(rows, d):
    """The row skip sums each output in its dense pass's order (fp32: channel k in lane k mod 16, as
    cpu_linear; int8: one chain in ascending k, as the int8 row kernel over every channel), so a pruned row
    gets the same bits from it as from the dense pass on its pruned input: callers may pick either per
    call without changing a row's result."""
    from runtime.ops import cpu_linear, quant_primitives

    g = torch.Generator().manual_seed(d + rows)
    n = 300  # more than one 256-output chunk, the second partial
    x = torch.randn(rows, d, generator=g)
    w = torch.randn(n, d, generator=g)
    q = torch.randint(-127, 128, (n, d), generator=g, dtype=torch.int8)
    scale = torch.rand(n, generator=g) + 0.5
    keeps = [(0.4, 0.8, 0.1, 0.55, 0.25)[i] for i in range(rows)]
    pruned = cpu_mlp._pruned(x, keeps)
    assert cpu_linear.library() is not None
    assert torch.equal(cpu_mlp._rowskip(x, keeps, w.t().contiguous()), cpu_linear.rows_linear(pruned, w, None))
    rows8 = quant_primitives.int8_rows(q)
    got = cpu_mlp._rowskip_int8(x, keeps, rows8, scale)
    assert torch.equal(got, cpu_mlp._int8_rows_linear(pruned, rows8, scale))
