"""The compiled Triton kernels on a CUDA device against the reference on CPU (skipped without CUDA; the
same kernels run on CPU under the interpreter in the other tests of this folder).

On a GPU machine: `python -m pytest -q tests/runtime/kernels/test_cuda_kernels.py` (benchmarks/gpu_session.sh
runs it first)."""
import pytest
import torch

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

CUDA = "cuda"


def _on_device(site: dict) -> dict:
    """An MLP site (tests/runtime/ops/mlp_sites.py) with every tensor moved to the device."""
    def move(v):
        if isinstance(v, list):
            return [move(t) for t in v]
        return v.to(CUDA) if isinstance(v, torch.Tensor) else v

    return {k: move(v) for k, v in site.items()}


def _bf16_row_bound(want):
    """4 bf16 ulps of the row's largest output: low-bit rows round intermediates to bf16."""
    return want.abs().amax(-1, keepdim=True) * 2.0 ** -6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("B,Hq,Hkv,S", [(1, 9, 3, 1000), (4, 8, 8, 300)])
def test_attention_decode_kernel_on_cuda(dtype, B, Hq, Hkv, S):
    import runtime.ops.library  # noqa: F401  torch.ops.solc.* (CPU: the reference's equal, tests/runtime/ops)
    from runtime.kernels import register
    from runtime.ops import reference as ref

    g = torch.Generator().manual_seed(B)
    D = 64
    k_cache, v_cache = torch.randn(B, Hkv, S + 8, D, generator=g), torch.randn(B, Hkv, S + 8, D, generator=g)
    positions = torch.tensor([[S - 1 - 37 * b] for b in range(B)])
    low, high = ref.page_stats(k_cache, positions[:, 0])
    q, k, v = (torch.randn(B, h, 1, D, generator=g) for h in (Hq, Hkv, Hkv))
    keep = torch.tensor([[0.1], [0.6], [1.0], [0.3]], dtype=torch.float64)[:B]
    cpu = [t.to(dtype) for t in (q, k, v, k_cache, v_cache, low, high)]
    gpu = [t.to(CUDA) for t in cpu]
    want = torch.ops.solc.attention(*cpu, positions, keep, D ** -0.5)  # writes k, v into the CPU cache copies
    got = register._attention_cuda(*gpu, positions.to(CUDA), keep.to(CUDA), D ** -0.5)
    tol = 2e-5 if dtype == torch.float32 else 3e-2
    torch.testing.assert_close(got.float().cpu(), want.float(), atol=tol, rtol=tol)
    for c, gt in zip(cpu[3:], gpu[3:]):  # caches and page statistics updated alike
        torch.testing.assert_close(gt.cpu(), c, atol=tol, rtol=tol)


@pytest.mark.parametrize("rows", [1, 5, 16])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sparse_mlp_kernel_on_cuda(rows, dtype):
    from runtime.kernels import register
    from runtime.ops import reference as ref
    from tests.runtime.ops.mlp_sites import call, make_site

    site = make_site("gated", dtype=dtype, bias=False, seed=rows, bits=())
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g).to(dtype)
    keep = torch.linspace(0.1, 1.0, rows, dtype=torch.float64)
    bits = torch.full((rows,), 16.0, dtype=torch.float64)
    want = call(ref.mlp, x, keep, bits, site, "activation").float()
    gsite = _on_device(site)
    got = call(register._mlp_cuda, x.to(CUDA), keep.to(CUDA), bits.to(CUDA), gsite, "activation").float().cpu()
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, atol=2e-5, rtol=2e-5)
    else:
        assert ((got - want).abs() <= _bf16_row_bound(want)).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("keep", [0.4, 1.0])
@pytest.mark.parametrize("rows", [1, 16])
def test_lowbit_mlp_kernels_on_cuda(bits, keep, rows):
    from runtime.kernels import register
    from runtime.ops import reference as ref
    from runtime.ops.step_hints import StepHints, step_hints
    from tests.runtime.ops.mlp_sites import call, make_site

    site = make_site("gated", dtype=torch.float32, bias=False, seed=bits)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, 64, generator=g)
    keep_t = torch.full((rows,), keep, dtype=torch.float64)
    bits_t = torch.full((rows,), float(bits), dtype=torch.float64)
    want = call(ref.mlp, x, keep_t, bits_t, site, "weight")
    gsite = _on_device(site)
    gx, gk, gb = x.to(CUDA), keep_t.to(CUDA), bits_t.to(CUDA)
    assert register.lowbit_uses_kernel(gx, gsite["w_in"], gsite["b_in"], "gated", "silu", gsite["packs"], bits)
    with step_hints(StepHints(attn=1.0, mlp=keep, bits=bits)):
        got = call(register._mlp_cuda, gx, gk, gb, gsite, "weight").cpu()
    assert ((got - want).abs() <= _bf16_row_bound(want)).all()


@pytest.mark.parametrize("quant", ["weight", "activation"])
def test_cuda_graph_decode_matches_the_cpu_reference(quant):
    """generate on CUDA (a CUDA graph per action: dense, a low-bit sparse action; a mixed step) against the
    CPU reference scoring the same tokens under the same schedule: per-token log-probs within 0.05 nats
    (kernels differ from the reference by summation order; low-bit rows also by bf16 roundings)."""
    import solc

    cpu_sol = solc.compile(solc.load_model("tiny-llama", seed=0), actions=["attn", "mlp", "quant"], quant=quant)
    gpu_sol = solc.compile(solc.load_model("tiny-llama", seed=0, device=CUDA), actions=["attn", "mlp", "quant"],
                           quant=quant)
    space = cpu_sol.space
    ids = torch.randint(0, 200, (2, 40), generator=torch.Generator().manual_seed(0))
    cheap = space.index(solc.Action(attn=0.1, mlp=0.4, bits=space.levels["quant"][0]))
    steps = 12
    sched = torch.tensor([space.dense_index, cheap] * (steps // 2))
    mixed = torch.stack([sched, sched.roll(1)])  # rows at different actions on every step: the generic step
    for schedule in (sched, mixed):
        out = gpu_sol.generate(ids.to(CUDA), schedule=schedule.to(CUDA), max_new_tokens=steps)
        ref_out = cpu_sol.score(out.tokens.cpu(), ids.shape[1], schedule=schedule)
        live = out.actions.cpu() >= 0  # -1: the row had finished (EOS)
        assert live[:, :4].all() and torch.equal(out.actions.cpu()[live], ref_out.actions[live])
        assert (out.logprobs.cpu() - ref_out.logprobs)[live].abs().max() < 0.05
