"""The decode-step paths the op takes for T == 1 equal the general reference."""
import pytest
import torch

from runtime.ops import reference as ref


def _cache(B, H, S, D, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, H, S, D, generator=g, dtype=dtype), torch.randn(B, H, S, D, generator=g, dtype=dtype)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
@pytest.mark.parametrize("hq,hkv", [(4, 2), (3, 3)])
def test_quest_decode_equals_quest_attention_for_the_newest_token(dtype, tol, hq, hkv):
    B, S, D = 3, 45, 8
    k, v = _cache(B, hkv, S, D, dtype, 0)
    q = torch.randn(B, hq, 1, D, generator=torch.Generator().manual_seed(1), dtype=dtype)
    pos = torch.tensor([[44], [17], [8]])  # rows at different lengths, partial and fresh pages
    keep = torch.tensor([[0.1], [0.6], [0.35]], dtype=torch.float64)
    low, high = ref.page_stats(k, pos[:, 0] + 1)
    got = ref.quest_decode(q, k, v, low, high, pos, keep, 0.3)
    expected = ref.quest_attention(q, k, v, pos, keep, 0.3)
    torch.testing.assert_close(got, expected, atol=tol, rtol=0)


def test_refresh_current_page_equals_page_stats_while_decoding():
    B, H, S, D = 2, 2, 29, 4
    k, _ = _cache(B, H, S, D, torch.float32, 2)
    low = torch.full((B, H, 4, D), float("inf"))
    high = torch.full((B, H, 4, D), float("-inf"))
    for p in range(S):  # append one key per step, both rows in lock step
        ref.refresh_current_page(low, high, k, torch.full((B, 1), p))
        exp_low, exp_high = ref.page_stats(k, torch.full((B,), p + 1))
        assert torch.equal(low, exp_low) and torch.equal(high, exp_high)


def test_quest_decode_rejects_several_queries():
    k, v = _cache(1, 1, 8, 4, torch.float32, 3)
    with pytest.raises(ValueError, match="T=2"):
        ref.quest_decode(torch.randn(1, 1, 2, 4), k, v, k[:, :, :1], k[:, :, :1], torch.tensor([[6, 7]]), torch.ones(1, 2), 1.0)
