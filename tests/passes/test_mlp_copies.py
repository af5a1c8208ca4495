"""The MLP pass makes each site's weight copies once, as graph buffers, and compile reports their memory."""
import pytest
import torch

import solc
from runtime import hf_adapter
from solc.models import TINY_MODELS

D, F_HID, LAYERS = 64, 128, 2  # tiny-llama


def _copies(sol):
    return {n: t for n, t in sol.graph.named_buffers() if n.startswith("solc_mlp_copy")}


def test_weight_mode_copies_and_their_memory():
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=32)
    got = sol.info["mlp_copies_bytes"]
    n_in = 2 * F_HID  # gate and up rows
    row_skip = LAYERS * D * n_in * 4  # fp32 W_in^T
    int8 = LAYERS * (n_in * D + n_in * 2 + D * (n_in + 8) + D * F_HID + D * 2)  # in8 + scales, in8_rows, out8
    int4_plain = LAYERS * (n_in * D // 2 + D * F_HID // 2)
    assert got["row_skip"] == row_skip and got["int8"] == int8
    assert got["int4"] >= 2 * int4_plain  # nibble copies + the CPU kernel's packing + scales/zeros
    assert sol.info["quant"] == "weight"
    copies = _copies(sol)
    assert len(copies) == LAYERS * 12  # every field of runtime.ops.mlp_weights.PACK_FIELDS (CPU model)
    # each copy is fed to its site's op: no op call transposes or quantizes
    ops = [n for n in sol.graph.graph.nodes if n.target is torch.ops.solc.mlp.default]
    for op in ops:
        packs = op.args[10]
        assert all(p is None or p.op == "get_attr" for p in packs)
        assert op.args[9] == "weight" and op.args[11] == 64  # the largest of 128/64/32 dividing 64 and 128


def test_dropping_a_level_drops_its_copy_and_activation_mode_makes_none():
    model = solc.load_model("tiny-llama")
    eight = solc.compile(model, max_seq_len=32, levels={"quant": [8, 16]}, verify=False)
    assert eight.info["mlp_copies_bytes"]["int4"] == 0 and eight.info["mlp_copies_bytes"]["int8"] > 0
    act = solc.compile(model, max_seq_len=32, quant="activation", verify=False)
    assert act.info["mlp_copies_bytes"] == {"row_skip": LAYERS * D * 2 * F_HID * 4, "int8": 0, "int4": 0}
    attn_only = solc.compile(model, actions=["attn"], max_seq_len=32, verify=False)
    assert attn_only.info["mlp_copies_bytes"] == {"row_skip": 0, "int8": 0, "int4": 0}


def test_in_dim_no_int4_group_divides_is_a_clear_error():
    model = hf_adapter.model_from_config(dict(TINY_MODELS["tiny-llama"], intermediate_size=80), seed=0)
    with pytest.raises(ValueError, match=r"MLP in-dims \[64, 80\]: no supported int4 group size divides them all"):
        solc.compile(model, max_seq_len=32)
    sol = solc.compile(model, max_seq_len=32, levels={"quant": [8, 16]}, verify=False)  # the way out it names
    assert sol.info["mlp_copies_bytes"]["int4"] == 0


def test_bad_quant_mode_at_compile():
    with pytest.raises(ValueError, match=r"quant='foo' is not a quant mode"):
        solc.compile(solc.load_model("tiny-llama"), quant="foo")
