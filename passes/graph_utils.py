"""Small helpers to read FX graphs captured by torch.export: module scopes and placeholders."""
from __future__ import annotations

import torch.fx as fx

from runtime.errors import UnsupportedModelError


def module_paths(node: fx.Node) -> list[str]:
    """The nn.Module paths enclosing `node`, outermost first ([] for nodes outside any module)."""
    stack = node.meta.get("nn_module_stack") or {}
    return [path for path, _ in stack.values() if isinstance(path, str)]


def innermost_module(node: fx.Node) -> str:
    paths = module_paths(node)
    return paths[-1] if paths else ""


def parent_path(path: str) -> str:
    return path.rpartition(".")[0]


def in_scope(node: fx.Node, scope: str) -> bool:
    return scope in module_paths(node)


def fake_shape(node: fx.Node) -> tuple:
    val = node.meta.get("val")
    if val is None:
        raise UnsupportedModelError(f"node {node.name} has no shape metadata (was the graph captured by torch.export?)")
    return tuple(val.shape)


def placeholders(graph: fx.Graph) -> list[fx.Node]:
    return [n for n in graph.nodes if n.op == "placeholder"]


def add_placeholder(graph: fx.Graph, name: str) -> fx.Node:
    """Append an input after the existing ones (placeholders must stay first in the graph)."""
    last = placeholders(graph)[-1]
    with graph.inserting_after(last):
        return graph.placeholder(name)


def find_placeholder(graph: fx.Graph, name: str) -> fx.Node:
    for n in placeholders(graph):
        if n.target == name or n.name == name:
            return n
    raise UnsupportedModelError(f"captured graph has no input named {name!r}; inputs: {[n.target for n in placeholders(graph)]}")


def is_call(node, *targets) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets
