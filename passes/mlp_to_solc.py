"""Rewrite every MLP site into one `solc::mlp` op that takes the action's mlp keep and bit-width.

A site is found from module scopes, never class names: in each transformer layer (the parent of an
attention site), the one child module other than attention that holds two or more linear layers.
Its body is matched op by op into one of runtime.ops.reference.MLP_KINDS; anything else raises
UnsupportedModelError naming the module and what was expected.

The weight copies the op's paths read (runtime.ops.mlp_weights: W_in^T for row skipping when the mlp
axis is enabled; int8 / int4 copies for the weight-quant levels) are made here, once, and become graph
buffers named `solc_mlp_copy.<site>.<field>` fed to the op: no call ever transposes or quantizes."""
from __future__ import annotations

import hashlib
import operator
from dataclasses import dataclass

import torch
import torch.fx as fx

from passes.base import GraphPass, MLPSite, PassContext
from passes.graph_utils import fake_shape, is_call, module_paths, parent_path
from runtime.errors import ArgumentError, UnsupportedModelError
from runtime.ops import library as _solc_ops  # noqa: F401  registers torch.ops.solc.*
from runtime.ops import mlp_weights
from runtime.ops.quant_primitives import int4_group_size

aten = torch.ops.aten
LINEAR = aten.linear.default
PASSTHROUGH = (aten.dropout.default, aten.clone.default, aten.alias.default)
COPY_PREFIX = "solc_mlp_copy"
EXPECTED = (
    "act(x@Wg)*(x@Wu) -> down (gated), act(chunk0(x@W))*chunk1 -> down (gated_fused) or "
    "act(x@W) -> down (plain), with act in silu/gelu/gelu_tanh/relu"
)


@dataclass
class _Match:
    kind: str
    act: str
    in_linears: list[fx.Node]
    out_linear: fx.Node


def activation_name(node) -> str | None:
    if is_call(node, aten.silu.default):
        return "silu"
    if is_call(node, aten.relu.default):
        return "relu"
    if is_call(node, aten.gelu.default):
        approximate = node.kwargs.get("approximate", node.args[1] if len(node.args) > 1 else "none")
        return {"none": "gelu", "tanh": "gelu_tanh"}.get(approximate)
    return None


def _strip_passthrough(node: fx.Node) -> fx.Node:
    while is_call(node, *PASSTHROUGH):
        node = node.args[0]
    return node


def _chunk_halves(a: fx.Node, b: fx.Node):
    """(source, first half, second half) when a and b are getitem 0/1 of a 2-way split of one node."""
    if not (is_call(a, operator.getitem) and is_call(b, operator.getitem)):
        return None
    split = a.args[0]
    if split is not b.args[0] or not is_call(split, aten.split.Tensor, aten.chunk.default, aten.split_with_sizes.default):
        return None
    if split.args[-1] not in (-1, len(fake_shape(split.args[0])) - 1) and split.kwargs.get("dim") not in (-1,):
        return None
    return split.args[0], {a.args[1]: a, b.args[1]: b}


def match_mlp(x: fx.Node, out: fx.Node, module: str) -> _Match:
    def fail(why: str) -> UnsupportedModelError:
        return UnsupportedModelError(f"MLP site {module}: {why}; expected {EXPECTED}")

    out = _strip_passthrough(out)
    if not is_call(out, LINEAR):
        raise fail(f"its output is {out.target}, not a linear layer")
    h = out.args[0]
    act = activation_name(h)
    if act is not None:  # plain: act(fc(x))
        fc = h.args[0]
        if is_call(fc, LINEAR) and fc.args[0] is x:
            return _Match("plain", act, [fc], out)
        raise fail("the activation does not read a linear layer of the MLP input")
    if not is_call(h, aten.mul.Tensor):
        raise fail(f"the down projection reads {h.target}")
    for gate_act, up in (h.args, reversed(h.args)):
        act = activation_name(gate_act)
        if act is None:
            continue
        gate = gate_act.args[0]
        if is_call(gate, LINEAR) and is_call(up, LINEAR) and gate.args[0] is x and up.args[0] is x:
            return _Match("gated", act, [gate, up], out)
        halves = _chunk_halves(gate, up)
        if halves is not None:
            fused, parts = halves
            if parts.get(0) is gate and parts.get(1) is up and is_call(fused, LINEAR) and fused.args[0] is x:
                return _Match("gated_fused", act, [fused], out)
    raise fail("its gate/up structure is not recognised")


def _scope_boundary(graph: fx.Graph, scope: str):
    """(inputs, outputs) of the nodes inside module `scope`: activations only, parameters excluded."""
    inside = [n for n in graph.nodes if n.op == "call_function" and scope in module_paths(n)]
    inside_set = set(inside)
    inputs, outputs = [], []
    for n in inside:
        for a in n.all_input_nodes:
            if a not in inside_set and a.op != "get_attr" and a not in inputs:
                inputs.append(a)
        if any(user not in inside_set for user in n.users):
            outputs.append(n)
    return inputs, outputs


def _linear_children(graph: fx.Graph, layer: str, exclude: str) -> dict[str, int]:
    """Child modules of `layer` (other than `exclude`) -> how many linear ops they hold."""
    counts: dict[str, int] = {}
    for n in graph.nodes:
        if not is_call(n, LINEAR):
            continue
        for path in module_paths(n):
            if parent_path(path) == layer and path != exclude:
                counts[path] = counts.get(path, 0) + 1
    return counts


def _tensor(gm: fx.GraphModule, node) -> torch.Tensor:
    if not isinstance(node, fx.Node) or node.op != "get_attr":
        raise UnsupportedModelError(f"MLP weight {node} is not a parameter of the graph")
    obj = gm
    for part in node.target.split("."):
        obj = getattr(obj, part)
    return obj


def copy_buffers(gm: fx.GraphModule) -> dict[str, torch.Tensor]:
    """Every weight copy this pass added to `gm`, by buffer name."""
    return {name: t for name, t in gm.named_buffers() if name.startswith(COPY_PREFIX + "_")}


def copy_digests(gm: fx.GraphModule) -> dict[str, str]:
    """sha256 of each weight copy's bytes, by buffer name (the artifact manifest records them; load checks
    that recomputing the copies gave the same bytes)."""
    return {name: hashlib.sha256(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
            for name, t in sorted(copy_buffers(gm).items())}


def copies_bytes(gm: fx.GraphModule) -> dict[str, int]:
    """Bytes of the weight copies by kind: "row_skip" (W_in^T), "int8", "int4"."""
    kinds = {"wt": "row_skip", "in8": "int8", "in8_scale": "int8", "in8_rows": "int8", "out8": "int8",
             "out8_scale": "int8"}
    out = {"row_skip": 0, "int8": 0, "int4": 0}
    for name, t in copy_buffers(gm).items():
        out[kinds.get(name.rsplit("__", 1)[-1], "int4")] += t.numel() * t.element_size()
    return out


class MLPToSolcPass(GraphPass):
    name = "mlp_to_solc"

    def run(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        graph = gm.graph
        if not ctx.attention_sites:
            raise UnsupportedModelError("the MLP pass needs the attention sites: run AttentionToSolcPass first")
        found = []
        for site in ctx.attention_sites:
            layer = parent_path(site.module)
            candidates = [p for p, c in _linear_children(graph, layer, site.module).items() if c >= 2]
            if len(candidates) != 1:
                raise UnsupportedModelError(
                    f"layer {layer}: expected exactly one MLP child module (a module with >= 2 linear "
                    f"layers besides the attention {site.module}), found {candidates or 'none'}"
                )
            module = candidates[0]
            inputs, outputs = _scope_boundary(graph, module)
            if len(inputs) != 1 or len(outputs) != 1:
                raise UnsupportedModelError(
                    f"MLP site {module}: expected one input and one output, found inputs "
                    f"{[n.name for n in inputs]} and outputs {[n.name for n in outputs]}"
                )
            x, out = inputs[0], outputs[0]
            found.append((site, module, x, out, match_mlp(x, out, module)))

        space = ctx.space
        bits = space.weight_bits
        row_skip = "mlp" in space.axes
        in_dims = [fake_shape(x)[-1] for _, _, x, _, _ in found] + [fake_shape(m.out_linear.args[0])[-1] for *_, m in found]
        try:
            group_size = int4_group_size(in_dims) if 4 in bits else 0
        except ValueError as e:  # the user's grid asks for int4 where this model cannot have it
            raise ArgumentError("levels", str(e)) from None
        for site, module, x, out, m in found:
            weights = [lin.args[1] for lin in m.in_linears]
            biases = [lin.args[2] if len(lin.args) > 2 else None for lin in m.in_linears]
            w_out = m.out_linear.args[1]
            b_out = m.out_linear.args[2] if len(m.out_linear.args) > 2 else None
            copies = mlp_weights.make_copies([_tensor(gm, w) for w in weights], _tensor(gm, w_out), m.kind,
                                             row_skip=row_skip, bits=bits, group_size=group_size)
            pack_nodes = []
            with graph.inserting_before(out):
                for field, tensor in zip(mlp_weights.PACK_FIELDS, copies):
                    if tensor is None:
                        pack_nodes.append(None)
                        continue
                    name = f"{COPY_PREFIX}_{module.replace('.', '_')}__{field}"
                    gm.register_buffer(name, tensor)
                    pack_nodes.append(graph.get_attr(name))
            with graph.inserting_after(out):
                new = graph.call_function(
                    torch.ops.solc.mlp.default,
                    (x, ctx.action_levels["mlp"], ctx.action_levels["bits"], weights, biases, w_out, b_out, m.kind,
                     m.act, space.quant, pack_nodes, group_size),
                )
            new.meta.update(out.meta)
            out.replace_all_uses_with(new)
            ctx.mlp_sites.append(
                MLPSite(site.layer, module, m.kind, m.act, fake_shape(x)[-1], fake_shape(m.out_linear.args[0])[-1])
            )
