"""runtime/cpu_program.py: the eager CPU program's rewrites keep the graph's arithmetic bit for bit."""
import pytest
import torch

import solc
from runtime.cpu_program import direct_cpu_calls
from runtime.dispatch import specialize
from runtime.ops import cpu_rotary


def _reference_rotary(x, cos, sin):
    """HF's `x * cos + rotate_half(x) * sin`, op by op as the exported graph runs it."""
    h = x.shape[-1] // 2
    return torch.ops.aten.add.Tensor(torch.ops.aten.mul.Tensor(x, cos),
                                     torch.ops.aten.mul.Tensor(torch.cat([torch.neg(x[..., h:]), x[..., :h]], -1), sin))


@pytest.mark.parametrize("batch,heads,dim,cos_rows", [(1, 9, 64, 1), (4, 3, 32, 4), (3, 2, 6, 1)])
def test_fused_rotary_has_the_bits_of_the_graph_ops(batch, heads, dim, cos_rows):
    g = torch.Generator().manual_seed(dim)
    # q as the graph makes it: a [B, 1, H, D] projection viewed as [B, H, 1, D] (not contiguous)
    x = (torch.randn(batch, 1, heads, dim, generator=g) * 30).transpose(1, 2)
    cos = torch.randn(cos_rows, 1, 1, dim, generator=g)
    sin = torch.randn(cos_rows, 1, 1, dim, generator=g)
    got = cpu_rotary.rotary(x, cos, sin)
    assert torch.equal(got, _reference_rotary(x, cos, sin))
    # the torch fallback (prefill: T > 1; fp64) is the same formula
    x3 = torch.randn(batch, heads, 5, dim, generator=g)
    c3, s3 = torch.randn(batch, 1, 5, dim, generator=g), torch.randn(batch, 1, 5, dim, generator=g)
    assert torch.equal(cpu_rotary.rotary(x3, c3, s3), _reference_rotary(x3, c3, s3))
    assert torch.equal(cpu_rotary.rotary(x.double(), cos.double(), sin.double()),
                       _reference_rotary(x.double(), cos.double(), sin.double()))


def test_a_broken_rotary_kernel_is_caught():
    """The equality above is not vacuous: the C kernel's sum with a fused multiply-add or the wrong
    half would differ."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 2, 1, 8, generator=g)
    cos, sin = torch.randn(1, 1, 1, 8, generator=g), torch.randn(1, 1, 1, 8, generator=g)
    wrong_half = x * cos + torch.cat([x[..., 4:], -x[..., :4]], -1) * sin
    assert not torch.equal(cpu_rotary.rotary(x, cos, sin), wrong_half)


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-neox", "tiny-phi3", "tiny-gemma", "tiny-qwen3"])
def test_every_rotary_of_the_model_is_fused_and_the_step_keeps_its_bits(name):
    sol = solc.compile(solc.load_model(name), max_seq_len=40)
    layers = len(sol.cache_specs)
    gm = specialize(sol.graph, sol.space.dense_index)
    direct = direct_cpu_calls(gm)
    fused = [n for n in direct.graph.nodes if n.target is cpu_rotary.rotary]
    assert len(fused) == 2 * layers  # q and k of every layer
    assert not any(n.target is torch.ops.aten.neg.default or n.target is torch.neg for n in direct.graph.nodes)
    g = torch.Generator().manual_seed(3)
    B, T = 2, 17
    ids = torch.randint(0, sol.token_embedding.shape[0], (B, T + 3), generator=g)
    caches = [sol.new_cache(B, 40), sol.new_cache(B, 40)]
    with torch.no_grad():
        for c in caches:  # a dense prefill through the op graph fills both caches alike
            sol.graph(*sol.signature.args(ids[:, :T], torch.arange(T).expand(B, T),
                                          torch.full((B, T), sol.space.dense_index), c))
        for t in range(3):
            pos = torch.full((B, 1), T + t)
            want = gm(*sol.signature.variant_args(ids[:, T + t:T + t + 1], pos, caches[0]))
            got = direct(*sol.signature.variant_args(ids[:, T + t:T + t + 1], pos, caches[1]))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
