"""runtime/cpu_program.py: the eager CPU program's rewrites keep the graph's arithmetic bit for bit."""
import pytest
import torch

import solc
from runtime.cpu_program import direct_cpu_calls
from runtime.dispatch import action_hints, specialize
from runtime.ops import cpu_block, cpu_chain, cpu_mlp, cpu_rotary, library
from runtime.ops.step_hints import step_hints


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


def _program_nodes(program):
    """The program's nodes and those of its fused blocks' own ops (what runs where the C block does not)."""
    return list(program.graph.nodes) + [n for b in cpu_block.blocks(program) for n in b.fallback.graph.nodes]


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt-neox", "tiny-phi3", "tiny-gemma", "tiny-qwen3"])
def test_every_rotary_of_the_model_is_fused_and_the_step_keeps_its_bits(name):
    sol = solc.compile(solc.load_model(name), max_seq_len=40)
    layers = len(sol.cache_specs)
    gm = specialize(sol.graph, sol.space.dense_index)
    direct = direct_cpu_calls(gm)
    nodes = _program_nodes(direct)
    fused = [n for n in nodes if n.target is cpu_rotary.rotary]
    assert len(fused) == 2 * layers  # q and k of every layer (some inside fused attention blocks)
    assert not any(n.target is torch.ops.aten.neg.default or n.target is torch.neg for n in nodes)
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


def _filled(sol, B, T, g):
    """Token ids [B, T + 6] and two caches holding the same dense prefill of the first T (op graph)."""
    ids = torch.randint(0, sol.token_embedding.shape[0], (B, T + 6), generator=g)
    caches = [sol.new_cache(B, 48), sol.new_cache(B, 48)]
    with torch.no_grad():
        for c in caches:
            sol.graph(*sol.signature.args(ids[:, :T], torch.arange(T).expand(B, T),
                                          torch.full((B, T), sol.space.dense_index), c))
    return ids, caches


@pytest.mark.parametrize("B", [1, 3])
def test_fused_blocks_keep_the_bits_of_the_graph(B, monkeypatch):
    """tiny-llama: every layer's attention block (norm after its mean, q/k/v, rotary, cache write, Quest
    attention, o_proj, residual) and MLP block (norm, input projection, activation, down projection,
    residual) are fused; decode steps under every action (the dispatcher's variants, with the step's
    hints) and a mixed batch (the generic program) give the op graph's logits and caches bit for bit.
    The variants run the C blocks only; the generic program's MLP blocks (no hints) run their own ops."""
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=48)
    g = torch.Generator().manual_seed(B)
    T = 21  # an odd length: the last page is partial
    ids, caches = _filled(sol, B, T, g)
    layers = len(sol.cache_specs)
    generic = direct_cpu_calls(sol.graph)
    kinds = [type(b) for b in cpu_block.blocks(generic)]
    assert kinds == [cpu_block.AttentionBlock, cpu_block.MlpBlock] * layers
    assert not any(n.target is library.attention_impl for n in generic.graph.nodes)
    fallbacks, one_by_one = [], []
    programs = {a: direct_cpu_calls(specialize(sol.graph, a)) for a in range(len(sol.space))}
    for tag, program in [("mixed", generic), *programs.items()]:
        for block in cpu_block.blocks(program):
            monkeypatch.setattr(block, "fallback", _counting(block.fallback, fallbacks, type(block)))
        chains = cpu_chain.chains(program)  # the whole run of blocks, layer after layer, is one chain
        assert len(chains) == 1 and chains[0].blocks == cpu_block.blocks(program)
        monkeypatch.setattr(chains[0], "run_blocks", _counting(chains[0].run_blocks, one_by_one, tag))
    with torch.no_grad():
        for t, a in enumerate(range(len(sol.space))):
            p = T + t % 6
            acts = torch.full((B, 1), a)
            want = sol.graph(*sol.signature.args(ids[:, p:p + 1], torch.full((B, 1), p), acts, caches[0]))
            with step_hints(action_hints(sol.space, a, p + 1)):
                got = programs[a](*sol.signature.variant_args(ids[:, p:p + 1], torch.full((B, 1), p), caches[1]))
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"action {sol.space[a]}")
        assert fallbacks == []  # every variant ran the C blocks
        # in one chain call, where every MLP block runs in one C call (its SiLU in C: AVX-512 torch)
        one_call = {a: all(b._plan.fused_silu for b in cpu_block.blocks(p) if isinstance(b, cpu_block.MlpBlock))
                    for a, p in programs.items()}
        assert one_by_one == [a for a in programs if not one_call[a]]
        assert all(b._plan.c_mean for p in programs.values() for b in cpu_block.blocks(p))
        means = [sum(n.target in (torch.ops.aten.mean.dim, torch.mean) for n in p.graph.nodes) for p in programs.values()]
        assert means == [1] * len(programs)  # only the final norm's: the blocks compute theirs
        if torch.backends.cpu.get_cpu_capability().startswith("AVX512"):  # aten's SiLU is Sleef's: in C too
            assert all(b._plan.fused_silu for p in programs.values() for b in cpu_block.blocks(p)
                       if isinstance(b, cpu_block.MlpBlock) and b._plan.mode != 4)
        p = T + 6
        acts = torch.randint(0, len(sol.space), (B, 1), generator=g)
        args = [sol.signature.args(ids[:, p - 1:p], torch.full((B, 1), p - 1), acts, c) for c in caches]
        torch.testing.assert_close(generic(*args[1]), sol.graph(*args[0]), rtol=0, atol=0)
        assert fallbacks == [] and one_by_one.count("mixed") == 0  # mixed rows: the chain too
    for a, b in zip(caches[0].tensors, caches[1].tensors):
        assert torch.equal(a, b)


def _index(space, attn, mlp, bits):
    return next(i for i, a in enumerate(space) if (a.attn, a.mlp, a.bits) == (attn, mlp, bits))


def test_a_mixed_batch_runs_in_one_chain_call_with_the_graphs_bits(monkeypatch):
    """tiny-llama, batch 4: mixed rows (no step hints) run the block chain in one C call, its MLP blocks
    in cpu_mlp.py's kernel groups (a bit level's rows together: dense kernel on per-row pruned inputs, fp32
    and int8 row skips, int4), and give the op graph's logits and caches bit for bit; a group without a C
    kernel (torch's int4) runs the blocks one by one, with the same bits."""
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=48)
    g = torch.Generator().manual_seed(11)
    B, T = 4, 19
    ids, caches = _filled(sol, B, T, g)
    generic = direct_cpu_calls(sol.graph)
    chain = cpu_chain.chains(generic)[0]
    fallbacks, one_by_one = [], []
    for block in cpu_block.blocks(generic):
        monkeypatch.setattr(block, "fallback", _counting(block.fallback, fallbacks, type(block)))
    monkeypatch.setattr(chain, "run_blocks", _counting(chain.run_blocks, one_by_one))
    sp = sol.space
    dense = sp.dense_index
    mixes = [
        [_index(sp, 1.0, 0.4, 16), _index(sp, 0.1, 0.4, 16), dense, _index(sp, 0.6, 0.8, 8)],  # 16: pruned dense; 8: skip
        [_index(sp, 1.0, 0.4, 16), _index(sp, 1.0, 0.4, 16), _index(sp, 0.1, 1.0, 4), _index(sp, 1.0, 0.4, 8)],
        [dense, _index(sp, 1.0, 1.0, 8), _index(sp, 1.0, 0.8, 8), _index(sp, 0.6, 0.4, 4)],
        *[torch.randint(0, len(sp), (B,), generator=g).tolist() for _ in range(2)],
    ]
    with torch.no_grad():
        for t, mix in enumerate(mixes):
            p = T + t
            acts = torch.tensor(mix)[:, None]
            args = [sol.signature.args(ids[:, p:p + 1], torch.full((B, 1), p), acts, c) for c in caches]
            calls = len(one_by_one)
            torch.testing.assert_close(generic(*args[1]), sol.graph(*args[0]), rtol=0, atol=0, msg=f"mix {mix}")
            kernels = cpu_mlp._kernel_groups([(sp[a].mlp, sp[a].bits) for a in mix], True, torch.float32)
            in_c = all(kern in chain._plan.modes for kern in kernels)
            assert len(one_by_one) == calls + (not in_c), f"mix {mix}: kernels {list(kernels)}"
            if t == 1:  # two 0.4 rows of one level (0.8 in all) row-skip together
                assert kernels[(16, True)] == [0, 1] and kernels[(8, True)] == [3]
        assert one_by_one == []  # every kernel of this machine's build is in C (int4 too, where it is built)
        # a kernel group the C cannot run (as where the int4 kernel is not built): the blocks one by one
        monkeypatch.delitem(chain._plan.modes, (4, False), raising=False)
        p = T + len(mixes)
        acts = torch.tensor([dense, _index(sp, 1.0, 1.0, 4), dense, _index(sp, 0.1, 0.4, 16)])[:, None]
        args = [sol.signature.args(ids[:, p:p + 1], torch.full((B, 1), p), acts, c) for c in caches]
        torch.testing.assert_close(generic(*args[1]), sol.graph(*args[0]), rtol=0, atol=0)
        assert len(one_by_one) == 1
    assert fallbacks == [cpu_block.MlpBlock] * (len(cpu_block.blocks(generic)) // 2) * len(one_by_one)
    for a, b in zip(caches[0].tensors, caches[1].tensors):
        assert torch.equal(a, b)


def test_a_fused_block_runs_its_own_ops_where_the_c_block_does_not_apply(monkeypatch):
    """Prefill (T > 1) and SOLC_CPU_FAST=0 run the matched nodes (the block's fallback), with the graph's bits."""
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=48)
    g = torch.Generator().manual_seed(5)
    B, T = 2, 9
    ids = torch.randint(0, sol.token_embedding.shape[0], (B, T + 1), generator=g)
    direct = direct_cpu_calls(sol.graph)
    calls = []
    for block in cpu_block.blocks(direct):
        monkeypatch.setattr(block, "fallback", _counting(block.fallback, calls))
    caches = [sol.new_cache(B, 48), sol.new_cache(B, 48)]
    dense = torch.full((B, T), sol.space.dense_index)
    with torch.no_grad():
        outs = [p(*sol.signature.args(ids[:, :T], torch.arange(T).expand(B, T), dense, c))
                for p, c in zip((sol.graph, direct), caches)]
        torch.testing.assert_close(outs[1], outs[0], rtol=0, atol=0)
        assert len(calls) == 2 * len(sol.cache_specs)  # prefill: every block ran its own ops
        monkeypatch.setenv("SOLC_CPU_FAST", "0")
        step = [sol.signature.args(ids[:, T:], torch.full((B, 1), T), torch.full((B, 1), 0), c) for c in caches]
        want, got = sol.graph(*step[0]), direct(*step[1])
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        assert len(calls) == 4 * len(sol.cache_specs)


def _counting(fn, calls, tag=1):
    def run(*a):
        calls.append(tag)
        return fn(*a)
    return run


def test_a_block_replans_for_another_cache_or_new_weight_data():
    """The blocks remember what they checked for a set of weights and caches: a step on another cache, and
    a step after a weight got new data, still give the op graph's bits."""
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=48)
    g = torch.Generator().manual_seed(11)
    B, T, a = 2, 13, sol.space.dense_index
    ids, caches = _filled(sol, B, T, g)
    ids2, caches2 = _filled(sol, B, T, g)
    program = direct_cpu_calls(specialize(sol.graph, a))
    with torch.no_grad():
        for t, (tokens, (want_cache, got_cache)) in enumerate([(ids, caches), (ids2, caches2), (ids2, caches2)]):
            if t == 2:  # the same cache as the last step, new data for a weight the program shares
                w = sol.graph.get_submodule("model.model.layers.0.self_attn.q_proj").weight
                w.data = w.data * 1.5
            p = T + t
            want = sol.graph(*sol.signature.args(tokens[:, p:p + 1], torch.full((B, 1), p), torch.full((B, 1), a),
                                                 want_cache))
            with step_hints(action_hints(sol.space, a, p + 1)):
                got = program(*sol.signature.variant_args(tokens[:, p:p + 1], torch.full((B, 1), p), got_cache))
            torch.testing.assert_close(got, want, rtol=0, atol=0, msg=f"step {t}")


@pytest.mark.parametrize("d", [64, 576, 1536, 2048, 100])
def test_the_c_mean_of_squares_is_atens_on_the_pinned_torch(d):
    """The blocks compute RMSNorm's mean of squares in C only where it has torch's bits (checked at run
    time, else torch's ops run): with the pinned torch it must hold, or the blocks silently lose that part."""
    from runtime.ops import cpu_linear

    lib = cpu_linear.library()
    if lib is None:
        pytest.skip("no C compiler")
    cpu_block._MEAN_IN_C.pop(d, None)
    assert cpu_block._aten_mean_in_c(lib, d)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(16, d, generator=g) * 7
    got, sq = torch.empty(16), torch.empty(d)
    lib.solc_mean_of_squares(x.data_ptr(), 16, d, got.data_ptr(), sq.data_ptr())
    assert torch.equal(got, torch.mean(torch.pow(x, 2), [-1], True).view(-1))


def test_a_program_with_planned_blocks_can_be_copied():
    """A deep copy of a program that already ran (its blocks planned for the original's weights) runs with
    the graph's bits: the copy's weights are other tensors, so its blocks re-plan."""
    import copy

    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=48)
    g = torch.Generator().manual_seed(12)
    B, T, a = 1, 9, sol.space.dense_index
    ids, caches = _filled(sol, B, T, g)
    program = direct_cpu_calls(specialize(sol.graph, a))
    with torch.no_grad():
        for t, prog in enumerate([program, None]):
            prog = prog or copy.deepcopy(program)
            p = T + t
            want = sol.graph(*sol.signature.args(ids[:, p:p + 1], torch.full((B, 1), p), torch.full((B, 1), a),
                                                 caches[0]))
            with step_hints(action_hints(sol.space, a, p + 1)):
                got = prog(*sol.signature.variant_args(ids[:, p:p + 1], torch.full((B, 1), p), caches[1]))
            torch.testing.assert_close(got, want, rtol=0, atol=0)
