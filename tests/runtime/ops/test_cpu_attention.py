"""The CPU decode fast path of solc::attention equals the reference (DESIGN invariant 2) and is batch
invariant (invariant 6)."""
import math

import pytest
import torch

from runtime.ops import cpu_attention, reference as ref
from runtime.ops import library  # noqa: F401  registers torch.ops.solc.*
from runtime.ops.step_hints import StepHints, step_hints

@pytest.fixture(autouse=True)
def _cpu_fast_paths_on(monkeypatch):
    monkeypatch.setenv("SOLC_CPU_FAST", "1")  # on by default; pinned in case the environment turned them off


TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 2e-2}


def _filled_cache(B, Hkv, S, D, dtype, positions, seed, shape_keys=None):
    """Caches holding random keys/values at each row's positions < its new position (garbage after, as
    a reused cache has), with the page statistics of those keys (shape_keys: edits the keys first)."""
    g = torch.Generator().manual_seed(seed)
    k = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    if shape_keys is not None:
        shape_keys(k)
    v = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    low, high = ref.page_stats(k, torch.tensor(positions))  # stats over keys < position
    return k, v, low, high


def _step(B, Hq, Hkv, S, D, dtype, positions, keeps, seed=0, hints=None):
    """Run the op for one decode step; return (output, caches after) and the reference's."""
    g = torch.Generator().manual_seed(seed + 1)
    k_cache, v_cache, low, high = _filled_cache(B, Hkv, S, D, dtype, positions, seed)
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    pos = torch.tensor(positions)[:, None]
    keep = torch.tensor(keeps, dtype=torch.float64)[:, None]
    scale = 1 / math.sqrt(D)
    caches = [t.clone() for t in (k_cache, v_cache, low, high)]
    with step_hints(hints):
        out = torch.ops.solc.attention(q, k, v, *caches, pos, keep, scale)
    # the definition: write the keys, then Quest attention over the cache (its own causal statistics)
    ek, ev = k_cache.clone(), v_cache.clone()
    library.write_kv(ek, ev, k, v, pos)
    expected = ref.quest_attention(q, ek, ev, pos, keep, scale)
    exp_low, exp_high = ref.page_stats(ek, pos[:, 0] + 1)
    return out, caches, expected, (ek, ev, exp_low, exp_high)


def _check(out, caches, expected, exp_caches, dtype):
    torch.testing.assert_close(out, expected, atol=TOL[dtype], rtol=0)
    assert out.is_contiguous()
    for got, exp in zip(caches, exp_caches):
        if got.shape[2] != exp.shape[2]:  # page stats: the op keeps ceil(S/8) pages, as page_stats
            exp = exp[:, :, :got.shape[2]]
        visible = torch.isfinite(exp) | torch.isfinite(got)
        assert torch.equal(got[visible], exp[visible])


@pytest.fixture(params=["c_kernel", "gather", "masked", "rule"])
def sparse_form(request, monkeypatch):
    """Pin the path: fp32's C kernel (cpu_attention.c), or the torch forms with the sparse form pinned (or
    the rule choosing), so that every path meets every case."""
    if request.param == "c_kernel":
        if cpu_attention._library() is None:
            pytest.skip("no C compiler: the kernel library does not build")
        return request.param
    monkeypatch.setattr(cpu_attention, "C_KERNEL", False)
    cost = {"gather": 0.0, "masked": math.inf, "rule": cpu_attention.GATHER_COST}[request.param]
    monkeypatch.setattr(cpu_attention, "GATHER_COST", cost)
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)], ids=["gqa", "mha"])
def test_batch_of_one_equals_the_reference(dtype, hq, hkv, sparse_form):
    S = 203  # not a multiple of 8: the last page of the cache is partial
    for p in (0, 5, 8, 63, 130, 202):  # first token, partial/fresh pages, the cache's last slot
        for keep in (0.1, 0.35, 0.6, 1.0):
            got = _step(1, hq, hkv, S, 16, dtype, [p], [keep], seed=p)
            _check(*got, dtype)


@pytest.mark.parametrize("D", [32, 64, 96, 128])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (10, 2), (4, 2)], ids=["G3", "G5", "G2"])
def test_real_head_dims_equal_the_reference(D, hq, hkv, sparse_form):
    """The head dims of real models: the C kernel's vector paths (keys 16 lanes at a time; values in
    32-channel blocks, or 64 with AVX-512: 96 takes the 32 path there, 128 two 64 blocks) and its
    head groups of 4 plus a remainder (G = 5), dense and sparse rows, a partial last page."""
    positions, keeps = [250, 7, 131], [1.0, 0.1, 0.35]
    _check(*_step(3, hq, hkv, 253, D, torch.float32, positions, keeps, seed=D + hq), torch.float32)


@pytest.mark.parametrize("D", [64, 48])
def test_a_nan_key_drops_its_page_as_in_the_reference(D, sparse_form):
    """A dense-masked row scores its pages from the keys as they pass (64: in registers, NaN checked per
    page; 48: the scalar fold): a page with a NaN key has NaN statistics, a NaN score, and is dropped by
    every head, as the reference drops it, so the output stays finite. Keys NaN in five pages, keep 0.6.
    (The torch gather form once kept them: topk ranks NaN above every number.)"""
    B, Hq, Hkv, S, p = 1, 9, 3, 520, 500
    k_cache, v_cache, _, _ = _filled_cache(B, Hkv, S, D, torch.float32, [p], 3)
    for t, d in [(77, 5), (130, 0), (131, 47), (263, 20), (499, 33)]:
        k_cache[0, t % Hkv, t, d] = float("nan")
    low, high = ref.page_stats(k_cache, torch.tensor([p]))
    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(B, h, 1, D, generator=g) for h in (Hq, Hkv, Hkv))
    pos, keep = torch.tensor([[p]]), torch.tensor([[0.6]], dtype=torch.float64)
    assert 3 * cpu_attention._kept_page_count(p, 0.6) * 1.6 > p // 8 + 1  # the premise: dense-masked
    out = torch.ops.solc.attention(q, k, v, k_cache.clone(), v_cache.clone(), low, high, pos, keep, 0.125)
    ek, ev = k_cache.clone(), v_cache.clone()
    library.write_kv(ek, ev, k, v, pos)
    expected = ref.quest_attention(q, ek, ev, pos, keep, 0.125)
    assert torch.isfinite(expected).all() and torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=TOL[torch.float32], rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)], ids=["gqa", "mha"])
def test_batch_of_16_with_mixed_levels_and_lengths_equals_the_reference(dtype, hq, hkv, sparse_form):
    g = torch.Generator().manual_seed(3)
    positions = torch.randint(0, 301, (16,), generator=g).tolist()
    keeps = [(0.1, 0.6, 1.0, 0.25)[i % 4] for i in range(16)]
    _check(*_step(16, hq, hkv, 301, 8, dtype, positions, keeps, seed=4), dtype)


@pytest.mark.parametrize("copy_limit", [cpu_attention.SUBSET_COPY_BYTES, 0], ids=["copied", "row_by_row"])
@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)], ids=["gqa", "mha"])
def test_rows_grouped_by_position_and_level_equal_the_reference(hq, hkv, copy_limit, sparse_form, monkeypatch):
    """Rows sharing a position and a kept-page count run as one group (a strict subset of the batch:
    consecutive rows as a view, others copied or row by row)."""
    monkeypatch.setattr(cpu_attention, "SUBSET_COPY_BYTES", copy_limit)
    positions = [200, 200, 200, 200, 77, 200, 77, 200]
    keeps = [0.1, 0.1, 1.0, 0.6, 0.1, 1.0, 0.1, 0.6]
    _check(*_step(8, hq, hkv, 207, 16, torch.float32, positions, keeps, seed=21), torch.float32)
    same = [150] * 6
    _check(*_step(6, hq, hkv, 160, 16, torch.float32, same, [0.25] * 6, seed=22), torch.float32)  # one group


@pytest.mark.parametrize("hints_for", ["uniform", "batch_of_one"])
def test_hints_give_the_same_result_as_reading_the_tensors(hints_for):
    if hints_for == "uniform":
        B, positions, keeps, hints = 4, [40, 77, 77, 12], [0.1] * 4, StepHints(attn=0.1, mlp=1.0, bits=16, kv_len=78)
    else:
        B, positions, keeps, hints = 1, [150], [0.6], StepHints(attn=0.6, kv_len=151)
    with_hints = _step(B, 6, 2, 160, 8, torch.float32, positions, keeps, seed=7, hints=hints)
    without = _step(B, 6, 2, 160, 8, torch.float32, positions, keeps, seed=7)
    assert torch.equal(with_hints[0], without[0])
    _check(*with_hints, torch.float32)


def test_tied_page_scores_keep_every_tied_page(sparse_form):
    """Pages with equal statistics score equally: all of them are kept when they tie at the k-th score."""
    B, Hq, Hkv, S, D = 1, 2, 1, 96, 4
    p = 95  # 12 visible pages; keep 0.1 -> budget 10 tokens -> 2 pages
    g = torch.Generator().manual_seed(0)
    k_cache = torch.randn(B, Hkv, S, D, generator=g) * 0.1
    k_cache[:, :, 16:24] = 3.0  # pages 2, 5 and 7 identical and the best: a 3-way tie at the 2nd score
    k_cache[:, :, 40:48] = 3.0
    k_cache[:, :, 56:64] = 3.0
    v_cache = torch.randn(B, Hkv, S, D, generator=g)
    q = torch.ones(B, Hq, 1, D)
    k, v = k_cache[:, :, p:p + 1].clone(), v_cache[:, :, p:p + 1].clone()
    low, high = ref.page_stats(k_cache, torch.tensor([p]))
    pos, keep = torch.tensor([[p]]), torch.tensor([[0.1]], dtype=torch.float64)
    out = torch.ops.solc.attention(q, k, v, k_cache.clone(), v_cache.clone(), low, high, pos, keep, 0.5)
    expected = ref.quest_attention(q, k_cache, v_cache, pos, keep, 0.5)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # the tie matters: keeping only 2 of the 3 tied pages gives another result
    two_pages = torch.zeros(S, dtype=torch.bool)
    two_pages[16:24] = two_pages[40:48] = True
    logits = (q[0, :, 0] @ k_cache[0, 0].T * 0.5).masked_fill(~two_pages, float("-inf"))
    assert not torch.allclose(out[0, :, 0], torch.softmax(logits, -1) @ v_cache[0, 0], atol=1e-3)


@pytest.mark.parametrize("keeps", [[1.0] * 4, [0.1] * 4, [0.1, 0.6, 1.0, 0.3]], ids=["dense", "sparse", "mixed"])
@pytest.mark.parametrize("same_length", [True, False])
def test_a_rows_result_does_not_depend_on_its_batch_mates(keeps, same_length, sparse_form):
    """Invariant 6 at the op: row 0 alone and inside a batch of 4 gives the same bits."""
    positions = [250] * 4 if same_length else [250, 31, 199, 250]
    k_cache, v_cache, low, high = _filled_cache(4, 3, 256, 64, torch.float32, positions, 11)
    gen = torch.Generator().manual_seed(12)
    q = torch.randn(4, 9, 1, 64, generator=gen)
    k = torch.randn(4, 3, 1, 64, generator=gen)
    v = torch.randn(4, 3, 1, 64, generator=gen)
    pos = torch.tensor(positions)[:, None]
    keep = torch.tensor(keeps, dtype=torch.float64)[:, None]
    caches = [t.clone() for t in (k_cache, v_cache, low, high)]
    batch = torch.ops.solc.attention(q, k, v, *caches, pos, keep, 0.125)
    for row in range(4):
        alone_caches = [t[row:row + 1].clone() for t in (k_cache, v_cache, low, high)]
        sl = slice(row, row + 1)
        alone = torch.ops.solc.attention(q[sl], k[sl], v[sl], *alone_caches, pos[sl], keep[sl], 0.125)
        assert torch.equal(batch[sl], alone), f"row {row}"


KEY_CHUNK = 2048  # cpu_attention.c: a dense row's keys are split into work items of this many


@pytest.fixture
def c_kernel():
    if cpu_attention._library() is None:
        pytest.skip("no C compiler: the kernel library does not build")


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)], ids=["gqa", "mha"])
def test_rows_longer_than_a_key_chunk_equal_the_reference(hq, hkv, c_kernel):
    """The C kernel splits dense and dense-masked rows into chunks of keys merged by their softmax maxima
    and sums: one chunk exactly (2048 keys), one key past it, several chunks with a partial last one; keep
    0.7 runs dense-masked for G = 1 and 3, keep 0.1 gathers."""
    positions, keeps = [4500, 2047, 2048, 4100, 6143], [1.0, 1.0, 1.0, 0.7, 0.1]
    _check(*_step(5, hq, hkv, 6150, 64, torch.float32, positions, keeps, seed=31), torch.float32)


LONG_ROW = 4 * KEY_CHUNK  # a gathering row of more keys than this one is long


@pytest.mark.parametrize("hq,hkv", [(9, 3), (4, 4)], ids=["gqa", "mha"])
def test_long_gathering_rows_equal_the_reference(hq, hkv, c_kernel):
    """Gathering rows of 8191 to 12002 keys (each query head an item of its own over its kept pages) equal
    the reference, with the same bits at 1, 2 and 3 threads and alone."""
    positions, keeps = [LONG_ROW - 2, LONG_ROW - 1, LONG_ROW, 12001], [0.1, 0.05, 0.1, 0.1]
    S = 12010
    out, caches, expected, exp_caches = _step(4, hq, hkv, S, 64, torch.float32, positions, keeps, seed=51)
    _check(out, caches, expected, exp_caches, torch.float32)
    for p, keep in zip(positions, keeps):  # the premise: every row gathers (G * kept * 1.6 <= visible pages)
        assert (hq // hkv) * cpu_attention._kept_page_count(p, keep) * 1.6 <= p // 8 + 1
    k_cache, v_cache, low, high = _filled_cache(4, hkv, S, 64, torch.float32, positions, 51)
    gen = torch.Generator().manual_seed(52)
    q, k, v = (torch.randn(4, h, 1, 64, generator=gen) for h in (hq, hkv, hkv))
    pos, keep = torch.tensor(positions)[:, None], torch.tensor(keeps, dtype=torch.float64)[:, None]

    _assert_same_bits_at_any_thread_count_and_alone((q, k, v, k_cache, v_cache, low, high, pos, keep), rows=[3])


@pytest.mark.parametrize("form,p,chunk,keep,seed", [("dense-masked", 4500, KEY_CHUNK, 0.34, 5),
                                                      ("gathering", 12001, LONG_ROW, 0.1, 55)])
def test_a_chunk_whose_pages_are_all_dropped_adds_nothing(form, p, chunk, keep, seed, c_kernel):
    """A row whose first keys (a chunk of the dense-masked form; 8192 keys of a gathering row) lose every
    page for every head (their keys 1000x smaller, so their page scores are near 0 while later pages score
    high): the dense-masked chunk's maximum is -inf and its weight in the merge 0, not NaN; the gathering
    row reads only the tail's pages. Both equal the reference."""
    S, D = p + 7, 64

    def faint_first_chunk(k):
        k[:, :, :chunk] *= 1e-3
    k_cache, v_cache, low, high = _filled_cache(1, 3, S, D, torch.float32, [p], seed, faint_first_chunk)
    gen = torch.Generator().manual_seed(seed + 1)
    q, k, v = torch.randn(1, 9, 1, D, generator=gen), torch.randn(1, 3, 1, D, generator=gen), torch.randn(1, 3, 1, D, generator=gen)
    pos, keeps = torch.tensor([[p]]), torch.tensor([[keep]], dtype=torch.float64)
    out = torch.ops.solc.attention(q, k, v, k_cache.clone(), v_cache.clone(), low, high, pos, keeps, 0.125)
    ek, ev = k_cache.clone(), v_cache.clone()
    library.write_kv(ek, ev, k, v, pos)
    expected = ref.quest_attention(q, ek, ev, pos, keeps, 0.125)
    # the premises: the row runs the form (dense-masked: G * kept * 1.6 > visible pages), and no head
    # keeps a page of the first chunk (the reference ignores its values)
    assert (3 * cpu_attention._kept_page_count(p, keep) * 1.6 > p // 8 + 1) == (form == "dense-masked")
    ev[:, :, :chunk] = 7.0
    assert torch.equal(ref.quest_attention(q, ek, ev, pos, keeps, 0.125), expected)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, expected, atol=TOL[torch.float32], rtol=0)


def test_a_long_rows_bits_depend_on_neither_the_thread_count_nor_its_batch_mates(c_kernel):
    """A row's key chunks, page-score blocks and heads' selections are work items shared out among
    threads; the split is fixed by the row's length, so 1, 2 or 3 threads and any batch give a row the
    same bits."""
    positions, keeps = [4500, 300, 2048, 4500], [1.0, 0.1, 0.6, 0.1]
    k_cache, v_cache, low, high = _filled_cache(4, 3, 4600, 64, torch.float32, positions, 41)
    gen = torch.Generator().manual_seed(42)
    q, k, v = torch.randn(4, 9, 1, 64, generator=gen), torch.randn(4, 3, 1, 64, generator=gen), torch.randn(4, 3, 1, 64, generator=gen)
    pos, keep = torch.tensor(positions)[:, None], torch.tensor(keeps, dtype=torch.float64)[:, None]

    _assert_same_bits_at_any_thread_count_and_alone((q, k, v, k_cache, v_cache, low, high, pos, keep), rows=range(4))


def _assert_same_bits_at_any_thread_count_and_alone(args, rows):
    """The op on (q, k, v, k_cache, v_cache, page_min, page_max, positions, keep) gives the batch the
    same bits at 1, 2 and 3 threads, and each of `rows` the same bits alone (the caches are cloned)."""
    q, k, v, *caches, pos, keep = args

    def run(sel):
        return torch.ops.solc.attention(q[sel], k[sel], v[sel], *(t[sel].clone() for t in caches), pos[sel], keep[sel], 0.125)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        bits = run(slice(None))
        for n in (2, 3):
            torch.set_num_threads(n)
            assert torch.equal(run(slice(None)), bits), f"{n} threads"
            for row in rows:
                assert torch.equal(run(slice(row, row + 1)), bits[row:row + 1]), f"row {row}, {n} threads"
    finally:
        torch.set_num_threads(threads)


def test_keep_count_host_equals_the_reference():
    for keep in (0.1, 0.6, 0.35, 0.6000000238418579, 1e-4, 0.999999, 1.0):
        for n in (1, 7, 8, 9, 10, 100, 513, 4097, 16385):
            assert cpu_attention.keep_count_host(keep, n) == ref.keep_count(keep, n)


def test_prefill_and_non_cpu_inputs_take_the_reference_path():
    q = torch.randn(1, 2, 3, 8)
    cache = torch.zeros(1, 2, 16, 8)
    assert not cpu_attention.supports(q, cache, cache)  # T = 3: prefill
    assert not cpu_attention.supports(q[:, :, :1], cache.transpose(2, 3), cache)  # not contiguous
    assert not cpu_attention.supports(q[:, :, :1], torch.zeros(1, 2, 4, 8), torch.zeros(1, 2, 4, 8))  # < 1 page
    assert cpu_attention.supports(q[:, :, :1], cache, cache)


def test_the_op_bumps_the_version_of_every_cache_it_writes_however_it_is_called():
    """autograd and torch.compile rely on version counters to see the caches' in-place writes."""
    k_cache, v_cache, low, high = _filled_cache(1, 2, 16, 8, torch.float32, [5], 0)
    q, k, v = torch.randn(1, 4, 1, 8), torch.randn(1, 2, 1, 8), torch.randn(1, 2, 1, 8)
    pos, keep = torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.float64)
    caches = (k_cache, v_cache, low, high)
    before = [t._version for t in caches]
    torch.ops.solc.attention(q, k, v, *caches, pos, keep, 0.3)
    assert [t._version for t in caches] > before and all(t._version > b for t, b in zip(caches, before))
    before = [t._version for t in caches]
    out = torch.ops.solc.attention(q, k, v, k_cache=k_cache, v_cache=v_cache, page_min=low, page_max=high,
                                   positions=pos, keep=keep, scale=0.3)
    assert all(t._version > b for t, b in zip(caches, before))
    assert out.shape == q.shape
