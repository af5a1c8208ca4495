"""Every linear layer the earlier passes left in the graph (attention projections, the LM head) becomes
`solc::linear`: on CPU its rows do not depend on their batch mates (runtime.ops.cpu_linear), which the
discrete actions downstream need (DESIGN invariant 6). Runs after MLPToSolcPass, which consumes the MLP
linears into `solc::mlp`."""
from __future__ import annotations

import torch
import torch.fx as fx

from passes.base import GraphPass, PassContext
from runtime.ops import library as _solc_ops  # noqa: F401  registers torch.ops.solc.*

aten = torch.ops.aten


class LinearToSolcPass(GraphPass):
    name = "linear_to_solc"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        for node in list(gm.graph.nodes):
            if node.op == "call_function" and node.target == aten.linear.default:
                x, weight, *rest = node.args
                node.target = torch.ops.solc.linear.default
                node.args = (x, weight, rest[0] if rest else None)
