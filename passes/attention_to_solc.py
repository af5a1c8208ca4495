"""Rewrite every attention site (an `aten.scaled_dot_product_attention` node) into `solc::attention`,
which owns a static KV cache per layer (new graph inputs: keys, values and per-page key min/max) and applies the action's attention keep.

The causal mask the model built for SDPA is dropped: solc::attention masks by absolute position.
Compile verifies the rewritten graph against the base model, which catches a mask that meant more
(padding, sliding windows shorter than the probe)."""
from __future__ import annotations

import math

import torch
import torch.fx as fx

from passes.base import AttentionSite, GraphPass, PassContext
from passes.graph_utils import add_placeholder, fake_shape, innermost_module, is_call
from runtime.errors import UnsupportedModelError
from runtime.ops import library as _solc_ops  # noqa: F401  registers torch.ops.solc.*
from runtime.kv_cache import CACHE_PARTS

aten = torch.ops.aten
SDPA = aten.scaled_dot_product_attention.default
RESHAPES = (aten.reshape.default, aten.view.default, aten._unsafe_view.default)


def unrepeat_kv(node: fx.Node) -> fx.Node:
    """Undo HF's GQA `repeat_kv` (unsqueeze -> expand -> reshape), so the cache holds KV heads only.

    Returns `node` unchanged when it is not a repeat (MHA, or SDPA called with enable_gqa)."""
    if not is_call(node, *RESHAPES):
        return node
    expand = node.args[0]
    if not is_call(expand, aten.expand.default):
        return node
    unsq = expand.args[0]
    if not is_call(unsq, aten.unsqueeze.default) or unsq.args[1] not in (2, -3):
        return node
    source = unsq.args[0]
    b, hkv, t, d = fake_shape(source)
    out = fake_shape(node)
    if len(out) != 4 or out[1] % hkv != 0 or out[3] != d:
        return node
    return source


class AttentionToSolcPass(GraphPass):
    name = "attention_to_solc"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        sites = [n for n in graph.nodes if is_call(n, SDPA)]
        if not sites:
            raise UnsupportedModelError(
                "no attention site found: expected aten.scaled_dot_product_attention nodes in the "
                "captured graph (load the model with attn_implementation='sdpa')"
            )
        keep = ctx.action_levels["attn"]
        for layer, sdpa in enumerate(sites):
            module = innermost_module(sdpa)
            q, k, v = sdpa.args[:3]
            kwargs = dict(zip(("attn_mask", "dropout_p", "is_causal"), sdpa.args[3:]), **sdpa.kwargs)
            if kwargs.get("dropout_p", 0.0) not in (0, 0.0):
                raise UnsupportedModelError(f"{module}: attention dropout must be 0 (put the model in eval mode)")
            k, v = unrepeat_kv(k), unrepeat_kv(v)
            b, n_heads, t, head_dim = fake_shape(q)
            n_kv_heads = fake_shape(k)[1]
            if n_heads % n_kv_heads or fake_shape(v)[1] != n_kv_heads:
                raise UnsupportedModelError(
                    f"{module}: expected query heads ({n_heads}) to be a multiple of key/value heads "
                    f"({n_kv_heads}, {fake_shape(v)[1]})"
                )
            scale = kwargs.get("scale")
            scale = float(scale) if scale is not None else 1.0 / math.sqrt(head_dim)
            cache = [add_placeholder(graph, f"{part}_{layer}") for part in CACHE_PARTS]
            with graph.inserting_before(sdpa):
                new = graph.call_function(
                    torch.ops.solc.attention.default, (q, k, v, *cache, ctx.positions, keep, scale)
                )
            new.meta.update(sdpa.meta)
            sdpa.replace_all_uses_with(new)
            graph.erase_node(sdpa)
            ctx.attention_sites.append(AttentionSite(layer, module, n_heads, n_kv_heads, head_dim, scale))
