"""runtime/ops/cpu_sample.py: the C top-p mask keeps the nucleus (the smallest prefix of the descending
order whose softmax mass reaches top_p) to ~1e-7 of mass; the torch form, summing in fp32, to ~1e-5."""
import pytest
import torch

from runtime.generate import _sample
from runtime.ops import cpu_linear, cpu_sample

pytestmark = pytest.mark.skipif(cpu_linear.library() is None, reason="needs the C library (a C compiler)")
NEG = float("-inf")


def _ideal_prefix_mass(logits: torch.Tensor) -> torch.Tensor:
    """[B, V] the fp64 softmax mass of the tokens before each one in descending order (ties by index)."""
    d = logits.double()
    order = torch.argsort(-d, dim=-1, stable=True)
    p = torch.softmax(d, -1).gather(-1, order)
    before = p.cumsum(-1) - p
    return torch.empty_like(before).scatter_(-1, order, before)


def _torch_form(logits, top_p):
    masked = logits.clone()
    cpu_sample.top_p_torch_(masked, top_p)
    return masked


def _check_nucleus(logits, top_p, masked, band=2e-5):
    """Every token whose fp64 prefix mass is clear of top_p by `band` is kept iff that mass < top_p."""
    before = _ideal_prefix_mass(logits)
    kept = masked > NEG
    clear = (before - top_p).abs() > band
    live = logits > NEG
    assert torch.equal(kept[clear & live], (before < top_p)[clear & live])
    assert not kept[~live].any()
    return int((~clear & live).sum())


@pytest.mark.parametrize("V", [1, 7, 1000, 49152])
@pytest.mark.parametrize("scale", [0.3, 3.0, 12.0])
@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.99])
def test_c_mask_is_the_nucleus(V, scale, top_p):
    g = torch.Generator().manual_seed(V + int(scale * 10))
    logits = torch.randn(6, V, generator=g) * scale
    logits[0, : V // 3] = NEG  # a top-k mask before it: those stay out and count for nothing
    c = logits.clone()
    assert cpu_sample.top_p_(c, top_p)
    _check_nucleus(logits, top_p, c, band=1e-6)
    _check_nucleus(logits, top_p, _torch_form(logits, top_p), band=2e-5)  # the torch form: fp32 sums
    assert (c > NEG).sum(-1).min() >= 1  # the top token always stays


def test_ties_keep_a_prefix_by_index_and_rows_do_not_depend_on_their_batch_mates():
    logits = torch.zeros(1, 10)  # ten equal tokens: 0.35 of the mass needs four of them
    c = logits.clone()
    cpu_sample.top_p_(c, 0.35)
    assert (c[0] > NEG).tolist() == [True] * 4 + [False] * 6
    g = torch.Generator().manual_seed(3)
    batch = torch.randn(5, 3000, generator=g) * 4
    together = batch.clone()
    cpu_sample.top_p_(together, 0.8)
    for r in range(5):
        alone = batch[r:r + 1].clone()
        cpu_sample.top_p_(alone, 0.8)
        assert torch.equal(alone, together[r:r + 1])


def test_sampling_draws_only_nucleus_tokens_and_matches_the_torch_form(monkeypatch):
    """`_sample` with top-p: over a grid of uniforms per row, the C mask and the torch form draw the same
    tokens (their masks agree away from the boundary, and these rows have no token on it)."""
    g = torch.Generator().manual_seed(11)
    logits = torch.randn(8, 5000, generator=g) * 3
    logits[:, :3] += 8  # peaked, as a language model's next-token logits are

    def draws():
        out = []
        for k in range(1, 200):
            monkeypatch.setattr("runtime.generate.uniforms", lambda gen, b, k=k: torch.full((b,), k / 200, dtype=torch.float64))
            out.append(_sample(logits, 0.9, None, 0.9, None))
        return torch.stack(out, 1)

    c = draws()
    monkeypatch.setattr(cpu_sample, "top_p_", lambda *a: False)
    t = draws()
    assert torch.equal(c, t)
    before = _ideal_prefix_mass(logits / 0.9)
    assert (before.gather(-1, c) < 0.9).all()  # every draw inside the nucleus


def test_tokens_below_the_head_span_are_dropped_with_the_tail_or_selected_when_the_nucleus_reaches_them():
    """cpu_sample.c first selects among the tokens in the fewest 1-nat bins below the top that hold top_p
    (at most 20 nats). Where their mass reaches
    top_p the tokens below are dropped; where it does not, the row runs again over every token."""
    logits = torch.cat([torch.zeros(1), -1.0 - torch.arange(5) * 1e-3, -20.5 - torch.arange(3000) * 1e-4])[None]
    tail = float(torch.softmax(logits.double(), -1)[0, 6:].sum())  # ~3.7e-6 below the span
    for top_p, kept in ((0.5, 3), (0.9, 6), (1 - tail / 2, None)):  # masses before: 0, .35, .48, .61, .74, .87
        c = logits.clone()
        assert cpu_sample.top_p_(c, top_p)
        if kept is not None:
            assert int((c > NEG).sum()) == kept
        else:  # the nucleus ends inside the tail: about half of it stays
            assert 1200 < int((c[0, 6:] > NEG).sum()) < 1800
        assert _check_nucleus(logits, top_p, c, band=1e-7) < 1000  # tail tokens lie ~4e-10 of mass apart
