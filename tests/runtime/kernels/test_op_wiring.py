"""The solc:: ops with the kernels registered: the CUDA entry points (run here on CPU tensors through the
interpreter) pick the kernels or fall back to the reference, and the ops keep working inside
torch.compile(fullgraph=True) and torch.export (CPU, reference implementation), matching eager."""
import copy

import pytest
import torch
from torch import nn

import runtime.ops.library  # noqa: F401  registers torch.ops.solc.* (and the CUDA kernels)
from runtime.kernels import register
from runtime.ops import reference as ref


def _mlp_args(rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    d, f = 24, 40
    x = torch.randn(rows, d, generator=g)
    keep = torch.linspace(0.1, 1.0, rows, dtype=torch.float64)
    bits = torch.tensor([5.0, 16.0, 7.0] * rows, dtype=torch.float64)[:rows]
    w_in = [torch.randn(f, d, generator=g) * 0.2, torch.randn(f, d, generator=g) * 0.2]
    return (x, keep, bits, w_in, [None, None], torch.randn(d, f, generator=g) * 0.2, None, "gated", "silu",
            "activation", [], 0)


@pytest.mark.parametrize("rows", [3, 17])  # 17 rows: over the kernel limit, the reference runs
def test_mlp_cuda_entry_point(rows):
    args = _mlp_args(rows)
    assert register.mlp_uses_kernel(args[0], args[3], args[4], args[5], args[6], args[7], args[8]) == (rows <= 16)
    got = register._mlp_cuda(*args)
    expected = ref.mlp(*args)
    dense = ref.mlp(args[0], args[1], None, *args[3:])
    step = dense.abs().amax(-1, keepdim=True) / (2 ** (args[2][:, None] - 1) - 1)
    assert ((got - expected).abs() <= step * 1.001 + 1e-5).all()


def test_mlp_cuda_entry_point_runs_the_reference_for_weight_quant_rows():
    from runtime.ops import mlp_weights

    x, keep, _, w_in, b_in, w_out, b_out, kind, act, *_ = _mlp_args(3)
    packs = mlp_weights.make_copies(w_in, w_out, kind, row_skip=True, bits=(8,), group_size=0)
    bits = torch.tensor([8.0, 16.0, 8.0], dtype=torch.float64)
    args = (x, keep, bits, w_in, b_in, w_out, b_out, kind, act, "weight", packs, 0)
    assert torch.equal(register._mlp_cuda(*args), ref.mlp(*args))


def _attn_args(T, seed=0, B=2, Hq=4, Hkv=2, S=40, D=16):
    g = torch.Generator().manual_seed(seed)
    k_cache, v_cache = torch.randn(B, Hkv, S, D, generator=g), torch.randn(B, Hkv, S, D, generator=g)
    start = torch.tensor([[30], [11]])
    positions = start + torch.arange(T)
    low, high = ref.page_stats(k_cache, start[:, 0])
    q = torch.randn(B, Hq, T, D, generator=g)
    k, v = torch.randn(B, Hkv, T, D, generator=g), torch.randn(B, Hkv, T, D, generator=g)
    keep = torch.tensor([[0.2], [0.6]], dtype=torch.float64).expand(B, T).contiguous()
    return [q, k, v, k_cache, v_cache, low, high, positions, keep, 0.25]


@pytest.mark.parametrize("T", [1, 3])  # T > 1 (prefill): the reference runs
def test_attention_cuda_entry_point(T):
    a, b = _attn_args(T), _attn_args(T)
    got = register._attention_cuda(*a)
    expected = torch.ops.solc.attention(*b)
    torch.testing.assert_close(got, expected, atol=2e-5, rtol=2e-5)
    for i in (3, 4, 5, 6):
        assert torch.equal(a[i], b[i])


def test_disabled_kernels_run_the_reference(monkeypatch):
    monkeypatch.setenv("SOLC_TRITON", "0")
    args = _mlp_args(2)
    assert not register.mlp_uses_kernel(args[0], args[3], args[4], args[5], args[6], args[7], args[8])
    assert torch.equal(register._mlp_cuda(*args), ref.mlp(*args))


class _Site(nn.Module):
    """One attention site and one MLP site, calling the ops the graph passes insert."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(3)
        B, Hkv, S, D, d, f = 2, 2, 32, 8, 12, 20
        self.wg = nn.Parameter(torch.randn(f, d, generator=g) * 0.3)
        self.wu = nn.Parameter(torch.randn(f, d, generator=g) * 0.3)
        self.wo = nn.Parameter(torch.randn(d, f, generator=g) * 0.3)
        self.register_buffer("k_cache", torch.randn(B, Hkv, S, D, generator=g))
        self.register_buffer("v_cache", torch.randn(B, Hkv, S, D, generator=g))
        low, high = ref.page_stats(self.k_cache, torch.tensor([9, 20]))
        self.register_buffer("page_min", low)
        self.register_buffer("page_max", high)

    def forward(self, x, q, k, v, positions, attn_keep, mlp_keep, bits):
        a = torch.ops.solc.attention(q, k, v, self.k_cache, self.v_cache, self.page_min, self.page_max,
                                     positions, attn_keep, 0.35)
        m = torch.ops.solc.mlp(x, mlp_keep, bits, [self.wg, self.wu], [None, None], self.wo, None, "gated", "silu",
                               "activation", [], 0)
        return a, m


def _step_inputs(step):
    g = torch.Generator().manual_seed(10 + step)
    return (torch.randn(2, 1, 12, generator=g), torch.randn(2, 4, 1, 8, generator=g),
            torch.randn(2, 2, 1, 8, generator=g), torch.randn(2, 2, 1, 8, generator=g),
            torch.tensor([[9 + step], [20 + step]]), torch.tensor([[0.3], [0.6]], dtype=torch.float64),
            torch.tensor([[0.4], [0.8]], dtype=torch.float64), torch.tensor([[5.0], [16.0]], dtype=torch.float64))


def _run(fn, module, steps=2):
    outs = [fn(*_step_inputs(s)) for s in range(steps)]
    return outs, [b.clone() for b in module.buffers()]


@torch.no_grad()  # inference, as the runtime runs the ops (they define no autograd formula)
def test_ops_inside_torch_compile_and_export_match_eager():
    eager_mod = _Site()
    compiled_mod, exported_src = copy.deepcopy(eager_mod), copy.deepcopy(eager_mod)
    eager, eager_bufs = _run(eager_mod, eager_mod)

    compiled = torch.compile(compiled_mod, fullgraph=True, dynamic=False)
    got, bufs = _run(compiled, compiled_mod)
    for (a, m), (ea, em) in zip(got, eager):
        torch.testing.assert_close(a, ea, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m, em, atol=1e-6, rtol=1e-6)
    for b, eb in zip(bufs, eager_bufs):
        assert torch.equal(b, eb)

    program = torch.export.export(exported_src, _step_inputs(0))
    exported = program.module()
    got, _ = _run(exported, exported)
    for (a, m), (ea, em) in zip(got, eager):
        torch.testing.assert_close(a, ea, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(m, em, atol=1e-6, rtol=1e-6)
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert "solc.attention.default" in targets and "solc.mlp.default" in targets
