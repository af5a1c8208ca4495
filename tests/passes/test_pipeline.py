"""Pass infrastructure: stable uuids, and the sites each pass records."""
import torch

import solc
from passes.action_levels import ActionLevelsPass
from passes.attention_to_solc import AttentionToSolcPass
from passes.base import GraphPass
from passes.linear_to_solc import LinearToSolcPass
from passes.mlp_to_solc import MLPToSolcPass
from solc.compile import PIPELINE


def test_pass_uuids_are_stable_and_distinct():
    uuids = [p.uuid() for p in PIPELINE]
    assert uuids == [p.uuid() for p in (ActionLevelsPass, AttentionToSolcPass, MLPToSolcPass, LinearToSolcPass)]
    assert len(set(uuids)) == len(uuids)
    assert all(len(u) == 16 and int(u, 16) >= 0 for u in uuids)

    class Edited(MLPToSolcPass):  # different source -> different uuid
        name = "edited"

    assert Edited.uuid() != MLPToSolcPass.uuid()
    assert issubclass(Edited, GraphPass)


def test_sites_recorded_with_kv_heads_and_kinds():
    sol = solc.compile(solc.load_model("tiny-phi3"), max_seq_len=32)
    att = sol.info["attention_sites"]
    assert [s.layer for s in att] == [0, 1]
    assert all((s.n_heads, s.n_kv_heads, s.head_dim) == (4, 2, 16) for s in att)
    assert att[0].module == "model.layers.0.self_attn"
    mlps = sol.info["mlp_sites"]
    assert [(m.module, m.kind, m.act) for m in mlps] == [
        ("model.layers.0.mlp", "gated_fused", "silu"),
        ("model.layers.1.mlp", "gated_fused", "silu"),
    ]
    # GQA caches hold KV heads only (the repeat_kv expansion was undone by the pass).
    cache = sol.new_cache(batch=1, max_len=8)
    assert cache.tensors[0].shape == (1, 2, 8, 16)
    assert cache.tensors[2].shape == (1, 2, 1, 16)  # page min: one page of 8 keys


def test_plain_mlp_and_mha_sites():
    sol = solc.compile(solc.load_model("tiny-gpt-neox"), max_seq_len=32)
    assert {(m.kind, m.act) for m in sol.info["mlp_sites"]} == {("plain", "gelu")}
    assert sol.info["attention_sites"][0].module == "gpt_neox.layers.0.attention"
    assert sol.info["attention_sites"][0].n_kv_heads == 4


def test_actions_are_a_graph_input():
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=32)
    names = [n.target for n in sol.graph.graph.nodes if n.op == "placeholder"]
    assert names[:3] == ["input_ids", "position_ids", "actions"]
    assert names[3:7] == ["k_cache_0", "v_cache_0", "page_min_0", "page_max_0"]
    assert len(names) == 3 + 4 * 2
    assert sol.graph.solc_action_levels.dtype == torch.float64


def test_every_linear_outside_the_mlp_sites_becomes_solc_linear():
    """The attention projections and the LM head run solc::linear (batch invariant on CPU); no aten.linear
    is left for a decode step to run as a batch-dependent GEMM."""
    model = solc.load_model("tiny-llama", dtype=torch.float32)
    sol = solc.compile(model, max_seq_len=32)
    targets = [n.target for n in sol.graph.graph.nodes if n.op == "call_function"]
    assert torch.ops.aten.linear.default not in targets
    n_layers = model.config.num_hidden_layers
    assert targets.count(torch.ops.solc.linear.default) == 4 * n_layers + 1  # q, k, v, o per layer + LM head
    assert targets.count(torch.ops.solc.mlp.default) == n_layers
