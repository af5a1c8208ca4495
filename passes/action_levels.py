"""Make the action an input of the graph (and note where the token embedding table is): `actions` [B, T] (indices into the action space) becomes
one level tensor per axis (attn keep, mlp keep, bits), read by every solc:: op downstream."""
from __future__ import annotations

import torch
import torch.fx as fx

from passes.base import GraphPass, PassContext
from passes.graph_utils import add_placeholder, find_placeholder, is_call
from runtime.errors import UnsupportedModelError

aten = torch.ops.aten
LEVEL_TABLE = "solc_action_levels"
LEVEL_COLUMNS = ("attn", "mlp", "bits")  # columns of ActionSpace.level_table()


class ActionLevelsPass(GraphPass):
    name = "action_levels"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        # float64: keep fractions turn into integer counts downstream, where float32 rounding of 0.6
        # could add one token or channel.
        gm.register_buffer(LEVEL_TABLE, ctx.space.level_table().to(torch.float64))
        ctx.positions = find_placeholder(graph, "position_ids")
        ctx.embedding_weight = input_embedding_weight(graph)
        actions = add_placeholder(graph, "actions")
        with graph.inserting_after(actions):
            table = graph.get_attr(LEVEL_TABLE)
        with graph.inserting_after(table):
            levels = graph.call_function(aten.index.Tensor, (table, [actions]))  # [B, T, 3]
        anchor = levels
        for column, axis in enumerate(LEVEL_COLUMNS):
            with graph.inserting_after(anchor):
                anchor = graph.call_function(aten.select.int, (levels, -1, column))
            ctx.action_levels[axis] = anchor


def input_embedding_weight(graph: fx.Graph) -> str:
    """Attribute path of the table that `aten.embedding` reads input_ids from (the policy needs it)."""
    ids = find_placeholder(graph, "input_ids")
    for node in ids.users:
        if is_call(node, aten.embedding.default) and node.args[0].op == "get_attr":
            return node.args[0].target
    raise UnsupportedModelError("no aten.embedding of input_ids found: cannot locate the token embedding table")
