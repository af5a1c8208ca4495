"""Quest decode attention kernels vs solc::attention's reference (CPU), under the interpreter: the
append writes the caches and page statistics bit-exactly, the output matches within dtype tolerance."""
import pytest
import torch

import runtime.ops.library  # noqa: F401  registers torch.ops.solc.*
from runtime.kernels.attention import quest_decode_attention
from runtime.ops import reference as ref

TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-2, rtol=2e-2),
       torch.float16: dict(atol=3e-3, rtol=3e-3)}


def _state(B, Hq, Hkv, S, D, dtype, positions, seed, dup_pages=False):
    g = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(B, Hkv, S, D, generator=g)
    if dup_pages:  # every full page holds the same 8 keys: equal statistics, equal scores, real ties
        k_cache[:, :, : S // 8 * 8] = k_cache[:, :, :8].repeat(1, 1, S // 8, 1)
    k_cache = k_cache.to(dtype)
    v_cache = torch.randn(B, Hkv, S, D, generator=g).to(dtype)
    pos = torch.tensor(positions).reshape(B, 1)
    low, high = ref.page_stats(k_cache, pos[:, 0])  # statistics over each row's keys before this step
    q = torch.randn(B, Hq, 1, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, 1, D, generator=g).to(dtype)
    if dup_pages:
        k = k_cache[:, :, :1].clone()
    return q, k, v, [k_cache, v_cache, low, high], pos


def _check(dtype, B, Hq, Hkv, S, D, positions, keeps, splits, block_pages, seed=0, dup_pages=False, scale=0.3):
    q, k, v, cache, pos = _state(B, Hq, Hkv, S, D, dtype, positions, seed, dup_pages)
    keep = torch.tensor(keeps, dtype=torch.float64).reshape(B, 1)
    mine = [t.clone() for t in cache]
    theirs = [t.clone() for t in cache]
    out = torch.full((B, Hq, 1, D), float("nan"), dtype=dtype)
    got = quest_decode_attention(q, *mine, pos, keep, scale, k=k, v=v, splits=splits, block_pages=block_pages,
                                 block_p=16, select_block=8, out=out)
    expected = torch.ops.solc.attention(q, k, v, *theirs, pos, keep, scale)
    assert got.data_ptr() == out.data_ptr() and not out.isnan().any()
    for name, a, b in zip(("k_cache", "v_cache", "page_min", "page_max"), mine, theirs):
        assert torch.equal(a, b), name
    torch.testing.assert_close(got.float(), expected.float(), **TOL[dtype])


@pytest.mark.parametrize(
    "dtype,B,Hq,Hkv,S,D,positions,keeps,splits,block_pages",
    [
        (torch.float32, 1, 4, 2, 45, 16, [44], [0.1], 2, 2),
        (torch.float32, 3, 4, 2, 45, 16, [44, 17, 8], [0.1, 0.6, 0.35], 3, 2),  # partial and fresh pages
        (torch.bfloat16, 2, 6, 2, 70, 24, [69, 40], [0.2, 1.0], 2, 4),  # D not a power of two; dense row
        (torch.float16, 2, 3, 3, 66, 16, [63, 0], [0.05, 0.5], 4, 2),  # MHA; a row at its first token
    ],
)
def test_quest_decode_kernels_match_reference(dtype, B, Hq, Hkv, S, D, positions, keeps, splits, block_pages):
    _check(dtype, B, Hq, Hkv, S, D, positions, keeps, splits, block_pages)


def test_ties_at_the_threshold_keep_every_tied_page():
    # all full pages tie: the reference keeps every page scoring >= the k-th best, i.e. all of them
    _check(torch.float32, 2, 2, 1, 64, 16, [60, 33], [0.1, 0.3], 2, 2, seed=4, dup_pages=True)


def test_decode_without_append_equals_reference_quest_decode():
    q, _, _, (k_cache, v_cache, _, _), pos = _state(2, 4, 2, 40, 16, torch.float32, [39, 21], seed=5)
    low, high = ref.page_stats(k_cache, pos[:, 0] + 1)
    keep = torch.tensor([[0.2], [0.5]], dtype=torch.float64)
    got = quest_decode_attention(q, k_cache, v_cache, low, high, pos, keep, 0.25, splits=1, block_pages=2,
                                 block_p=16, select_block=8)
    expected = ref.quest_decode(q, k_cache, v_cache, low, high, pos, keep, 0.25)
    torch.testing.assert_close(got, expected, **TOL[torch.float32])
