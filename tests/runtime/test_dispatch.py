"""The step dispatcher's eager CPU programs (runtime/dispatch.py): the direct-call copy of a graph
computes exactly what the op graph computes, and autograd still gets the ops."""
import pytest
import torch

import solc
from runtime.dispatch import StepDispatcher, _EagerCPU, direct_cpu_calls, specialize
from runtime.ops import cpu_block, library


@pytest.fixture(scope="module", params=["tiny-llama", "tiny-gpt-neox"])
def sol(request):
    return solc.compile(solc.load_model(request.param), max_seq_len=48)


def _solc_targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and str(n.target).startswith("solc.")]


def test_every_solc_op_has_a_direct_cpu_implementation(sol):
    ops = set(_solc_targets(sol.graph))
    assert ops == {torch.ops.solc.attention.default, torch.ops.solc.mlp.default, torch.ops.solc.linear.default}
    assert ops <= set(library.CPU_IMPLS)
    direct = direct_cpu_calls(sol.graph)
    assert _solc_targets(direct) == []
    # every op node became a direct call, in the program or inside a fused block's own ops
    nodes = list(direct.graph.nodes) + [n for b in cpu_block.blocks(direct) for n in b.fallback.graph.nodes]
    assert not any(_solc_targets(b.fallback) for b in cpu_block.blocks(direct))
    assert sum(n.target in set(library.CPU_IMPLS.values()) for n in nodes) == len(_solc_targets(sol.graph))
    assert _solc_targets(sol.graph)  # the model's own graph keeps its ops (export, compile see them)


def _run(program, sol, ids, positions, actions, cache):
    return program(*sol.signature.args(ids, positions, actions, cache))


def test_direct_calls_equal_the_op_graph_bit_for_bit(sol):
    """Prefill, then decode steps under every action (uniform rows) and a mixed batch: the direct-call
    program and the op graph, each on its own cache, give the same logits, hidden states and caches."""
    g = torch.Generator().manual_seed(0)
    B, T, V = 3, 20, sol.token_embedding.shape[0]
    ids = torch.randint(0, V, (B, T + 4), generator=g)
    caches = [sol.new_cache(B, 48), sol.new_cache(B, 48)]
    programs = [sol.graph, direct_cpu_calls(sol.graph)]
    pos = torch.arange(T).expand(B, T)
    dense = torch.full((B, T), sol.space.dense_index)
    with torch.no_grad():
        outs = [_run(p, sol, ids[:, :T], pos, dense, c) for p, c in zip(programs, caches)]
        torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
        steps = [torch.full((B, 1), a) for a in range(len(sol.space))]
        steps.append(torch.randint(0, len(sol.space), (B, 1), generator=g))  # mixed rows
        for t, acts in enumerate(steps):
            p = T + t % 4
            ids_t, pos_t = ids[:, p:p + 1], torch.full((B, 1), p)
            outs = [_run(prog, sol, ids_t, pos_t, acts, c) for prog, c in zip(programs, caches)]
            torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0, msg=f"step {t}")
    for a, b in zip(caches[0].tensors, caches[1].tensors):
        assert torch.equal(a, b)


def test_eager_cpu_program_keeps_the_ops_under_autograd(sol):
    """With grad enabled the op graph runs (its autograd wrappers); without, the direct calls."""
    gm = specialize(sol.graph, sol.space.dense_index)
    program = _EagerCPU(gm)
    seen = []
    handle = library.CPU_IMPLS[torch.ops.solc.linear.default]

    def spy(*args):
        seen.append(torch.is_grad_enabled())
        return handle(*args)

    for node in program.direct.graph.nodes:
        if node.target is handle:
            node.target = spy
    program.direct.recompile()
    ids, pos = torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long)
    cache = sol.new_cache(1, 8)
    with torch.no_grad():
        program(*sol.signature.variant_args(ids, pos, cache))
    assert seen and not any(seen)
    n = len(seen)
    with torch.enable_grad():
        program(*sol.signature.variant_args(ids, pos, sol.new_cache(1, 8)))
    assert len(seen) == n  # the op graph ran: the direct copy was not called


def test_dispatcher_eager_cpu_is_the_default_on_cpu(sol):
    disp = StepDispatcher(sol)
    assert disp.mode == "eager" and disp._eager_cpu
    assert not StepDispatcher(sol, mode="compile")._eager_cpu


def _count(gm, target):
    return sum(n.target is target for n in gm.graph.nodes)


def test_checks_and_no_op_casts_are_dropped_only_while_the_traced_dtypes_hold(sol):
    to, check = torch.ops.aten.to.dtype, torch.ops.aten._assert_tensor_metadata.default
    direct = direct_cpu_calls(sol.graph)
    assert _count(sol.graph, check) > 0 and _count(direct, check) == 0
    assert _count(direct, to) < _count(sol.graph, to)
    node = next(n for n in sol.graph.graph.nodes if n.op == "get_attr" and "weight" in n.target)
    *path, name = node.target.split(".")
    owner = sol.graph
    for part in path:
        owner = getattr(owner, part)
    weight = getattr(owner, name)
    saved = weight.data
    try:
        weight.data = saved.double()  # the metadata no longer says what runs: keep every cast
        assert _count(direct_cpu_calls(sol.graph), to) == _count(sol.graph, to)
    finally:
        weight.data = saved


def test_prefill_returns_the_hidden_states_of_the_full_graph_without_the_lm_head(sol):
    from runtime.dispatch import hidden_only

    program = hidden_only(sol.graph)
    lin, attn = torch.ops.solc.linear.default, torch.ops.solc.attention.default
    assert _count(program, attn) == _count(sol.graph, attn)  # the cache writes stay
    assert _count(program, lin) == _count(sol.graph, lin) - 1  # the LM head is gone
    g = torch.Generator().manual_seed(5)
    B, T = 2, 13
    ids = torch.randint(0, sol.token_embedding.shape[0], (B, T), generator=g)
    pos = torch.arange(T).expand(B, T)
    caches = [sol.new_cache(B, 32), sol.new_cache(B, 32)]
    with torch.no_grad():
        _, want = _run(sol.graph, sol, ids, pos, torch.full((B, T), sol.space.dense_index), caches[0])
        got = StepDispatcher(sol).prefill(ids, pos, caches[1], kv_len=T)
    assert torch.equal(got, want)
    for a, b in zip(caches[0].tensors, caches[1].tensors):
        assert torch.equal(a, b)
