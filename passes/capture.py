"""Capture the frozen base model as an FX graph with torch.export (non-strict).

The graph is captured once with a dynamic batch and sequence length and *without* the model's own
KV cache: the attention pass gives every attention site solc's static cache instead, so one graph
serves the teacher-forced pass (T tokens from position 0) and cached decode steps (T new tokens at
any positions) alike.
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn

from runtime import hf_adapter

EXAMPLE_BATCH, EXAMPLE_SEQ = 2, 8  # > 1 so export does not specialise the dynamic dims to 1


class _LogitsAndHidden(nn.Module):
    """Calls the base model with explicit positions and returns (logits, last hidden state)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids, position_ids):
        return hf_adapter.causal_lm_forward(self.model, input_ids, position_ids)


def capture(model: nn.Module, max_seq_len: int) -> fx.GraphModule:
    """Export `model` to a GraphModule taking (input_ids [B, T], position_ids [B, T])."""
    device = next(model.parameters()).device
    ids = torch.zeros(EXAMPLE_BATCH, EXAMPLE_SEQ, dtype=torch.long, device=device)
    pos = torch.arange(EXAMPLE_SEQ, device=device).expand(EXAMPLE_BATCH, -1).contiguous()
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=1, max=max_seq_len)
    dims = {0: batch, 1: seq}
    with torch.no_grad():
        program = torch.export.export(
            _LogitsAndHidden(model), (ids, pos), dynamic_shapes=(dims, dims), strict=False
        )
    gm = program.module()
    _strip_wrapper_prefix(gm)
    # The passes change the signature (actions and caches become inputs): use plain positional
    # code generation instead of the exported pytree calling convention and its input checks.
    gm.graph._codegen = fx.graph.CodeGen()
    gm._forward_pre_hooks.clear()
    gm.recompile()
    return gm


def _strip_wrapper_prefix(gm: fx.GraphModule) -> None:
    """Name module scopes as the user knows them ("model.layers.0.mlp", not "model.model.layers...")."""
    prefix = "model."
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if not stack:
            continue
        node.meta["nn_module_stack"] = {
            key: (path[len(prefix):] if isinstance(path, str) and path.startswith(prefix) else path, cls)
            for key, (path, cls) in stack.items()
        }
