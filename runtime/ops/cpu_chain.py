"""A decode step's consecutive fused blocks (cpu_block.py: every layer's attention block, then its MLP
block) as one C call, for the eager CPU program.

Why: with the blocks fused, what was left of a SmolLM2 step outside C was mostly the blocks' own
crossings: each packed ~30 ctypes arguments and ran its checks (the same weights? the same caches? the
step's positions and kept pages), cold, ~60-80 us a block, 60 blocks a step: 4-5 ms of a 25-40 ms step.
A chain plans every block's arguments once (a C struct each, `solc_chain_block` in cpu_block.c), checks
its static inputs with one pass over their ids and data pointers, computes the step's positions and kept
pages once, and crosses once. Each block runs exactly the C its own call runs, so the bits stay.

A mixed batch (no one action for every row: the generic program) runs in the chain too: the attention
blocks read each row's kept pages anyway, and the MLP blocks run the step's rows in cpu_mlp.py's kernel
groups (one bit level, one plan each), gathered and scattered in C. Where the chain does not apply
(prefill; a block that cannot plan its C; a block whose mean of squares stays torch's; a mixed group
whose kernel is torch's int4) the blocks run one by one as before, each with its own fallback.
"""
from __future__ import annotations

import copy
import ctypes
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor

from runtime.ops import cpu_attention, cpu_block, cpu_linear, cpu_mlp, library, reference, step_hints

_F32 = torch.float32
_P, _I64, _F64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double


class ChainBlock(ctypes.Structure):
    """cpu_block.c's `solc_chain_block`: one block's planned arguments (pointers as integers)."""
    _fields_ = [("kind", _I64), ("eps", _F64), ("scale", _F64), ("norm_w", _P), ("B", _I64), ("d", _I64),
                *((n, _P) for n in ("wq", "bq", "wk", "bk", "wv", "bv", "wo", "bo",
                                    "k_cache", "v_cache", "page_min", "page_max")),
                *((n, _I64) for n in ("Hq", "Hkv", "S", "P", "D", "per_task")), ("scratch", _P),
                *((n, _I64) for n in ("mode", "keep_count", "F", "group")),
                *((n, _P) for n in ("wg", "wu", "wt", "wd", "in8", "out8", "in8_rows", "in4", "out4",
                                    "in8_scale", "in4_sz", "out8_scale", "out4_sz", "h", "pre", "hid", "sel", "work"))]


_SHARED = ("cos", "sin", "positions", "keep")  # one node for every attention block of a chain


class BlockChain:
    """A chain node's target: the blocks in one C call where that applies, else the blocks one by one.
    `arg_maps[i]` gives block i's inputs as indices into the chain's inputs (-1: the previous block's output)."""

    def __init__(self, blocks: list, arg_maps: list[tuple[int, ...]], n_inputs: int):
        self.__name__ = "block_chain"  # for FX's code generation
        self.blocks, self.arg_maps, self.n_inputs = blocks, arg_maps, n_inputs
        first_attn = next(i for i, b in enumerate(blocks) if isinstance(b, cpu_block.AttentionBlock))
        self.shared = {r: arg_maps[first_attn][blocks[first_attn].roles[r]] for r in _SHARED}
        self.x_index = arg_maps[0][blocks[0].roles["x"]]
        dynamic = {arg_maps[i][b.roles[r]] for i, b in enumerate(blocks) for r in b.DYNAMIC
                   if b.roles[r] is not None}
        self.static_candidates = tuple(j for j in range(n_inputs) if j not in dynamic)
        # the (keep, bits) inputs every MLP block reads, where they share one pair: a mixed batch's rows
        # are grouped once a step; else mixed steps run the blocks one by one
        levels = {(arg_maps[i][b.roles["keep"]], arg_maps[i][b.roles["bits"]])
                  for i, b in enumerate(blocks) if isinstance(b, cpu_block.MlpBlock)}
        self.mlp_levels = next(iter(levels)) if len(levels) == 1 and min(next(iter(levels))) >= 0 else None
        self._plan: Optional[cpu_block.Plan] = None

    def __deepcopy__(self, memo):
        return BlockChain(copy.deepcopy(self.blocks, memo), list(self.arg_maps), self.n_inputs)

    def __call__(self, *inputs):
        out = self._c_chain(inputs)
        return self.run_blocks(inputs) if out is None else out

    def run_blocks(self, inputs):
        """The blocks one by one (each its C call or its own ops)."""
        x = None
        for block, amap in zip(self.blocks, self.arg_maps):
            x = block(*[x if j < 0 else inputs[j] for j in amap])
        return x

    def _c_chain(self, inputs) -> Optional[Tensor]:
        if not cpu_attention.C_KERNEL or not library.cpu_fast_paths():
            return None
        hints = step_hints.current()
        uniform = hints is not None and hints.mlp is not None and hints.bits is not None
        if not uniform and self.mlp_levels is None:
            return None
        key = (hints.mlp, hints.bits) if uniform else cpu_block.MIXED_ROWS
        plan = self._plan
        if plan is None or not plan.matches(inputs, key):
            plan = self._plan = self._make_plan(inputs, key)
        if plan.descs is None:
            return None
        s = self.shared
        x, cos, sin = inputs[self.x_index], inputs[s["cos"]], inputs[s["sin"]]
        if not cpu_block.step_inputs_fit(plan, plan.head_dim, x, cos, sin):
            return None
        rows = None if uniform else self._row_groups(plan, *(inputs[j] for j in self.mlp_levels))
        if not uniform and rows is None:
            return None
        pos, kept = cpu_block.step_pages(inputs[s["keep"]], inputs[s["positions"]])
        out = torch.empty(plan.x_shape, dtype=_F32)
        if plan.lib.solc_block_chain(plan.descs.data_ptr(), len(self.blocks), x.data_ptr(), out.data_ptr(),
                                     plan.buf.data_ptr(), cos.data_ptr(), sin.data_ptr(),
                                     cos.stride(0) if cos.shape[0] > 1 else 0, pos.data_ptr(), kept.data_ptr(),
                                     None if rows is None else rows.data_ptr(), plan.row_buf.data_ptr(),
                                     torch.get_num_threads()):
            return None
        return out

    @staticmethod
    def _row_groups(plan: cpu_block.Plan, keep: Tensor, bits: Tensor) -> Optional[Tensor]:
        """A mixed step's MLP kernel groups as solc_block_chain reads them: [G, then per group its mode, m,
        its m rows, their kept-channel counts]; the groups and each group's plan are cpu_mlp.py's own
        (`_kernel_groups`), so every row runs the kernel the op would run it with. None where a group's
        kernel has no C mode in every MLP block (torch's int4 kernel; a missing copy)."""
        B, d = plan.B, plan.d
        actions = cpu_mlp._row_actions(keep, bits, (B, 1))
        groups = cpu_mlp._kernel_groups(actions, True, _F32)
        rows = [len(groups)]
        for kern, members in groups.items():
            mode = plan.modes.get(kern)
            if mode is None:
                return None
            rows += [mode, len(members), *members, *(reference.keep_count(actions[i][0], d) for i in members)]
        return torch.tensor(rows, dtype=torch.int64)

    def _make_plan(self, inputs, key) -> cpu_block.Plan:
        """Every block's plan (each block's own `_make_plan`, with the chain's first x standing for the
        blocks' inputs), written as descriptors; a plan without descriptors where any block cannot run in C."""
        lib = cpu_linear._library or cpu_linear.library()
        x = inputs[self.x_index]
        statics = tuple(j for j in self.static_candidates if isinstance(inputs[j], Tensor))
        if lib is None or lib.solc_chain_block_size() != ctypes.sizeof(ChainBlock) or not isinstance(x, Tensor):
            return cpu_block.Plan(inputs, statics, key, descs=None)
        used = set()
        descs = torch.zeros(len(self.blocks) * ctypes.sizeof(ChainBlock), dtype=torch.uint8)
        table = (ChainBlock * len(self.blocks)).from_address(descs.data_ptr())
        head_dim = None
        for block, amap, desc in zip(self.blocks, self.arg_maps, table):
            own = tuple(x if j < 0 else inputs[j] for j in amap)
            attention = isinstance(block, cpu_block.AttentionBlock)
            p = block._make_plan(own) if attention else block._make_plan(own, key)
            if p is None or not p.c_mean or p.x_shape != x.shape or not (attention or p.fused_silu):
                return cpu_block.Plan(inputs, statics, key, descs=None)
            block._plan = p
            used.update(amap[block.roles[r]] for r in _used_roles(block, p) if block.roles.get(r) is not None)
            desc.eps, desc.B, desc.d = block.eps, p.x_shape[0], p.x_shape[2]
            if attention:
                head_dim = block.head_dim
                desc.kind, desc.scale = 0, block.scale
                (desc.norm_w, _, _, desc.wq, desc.bq, desc.wk, desc.bk, desc.wv, desc.bv) = p.weights
                desc.k_cache, desc.v_cache, desc.page_min, desc.page_max = p.caches
                desc.Hq, desc.Hkv, desc.S, desc.P, desc.D = p.dims
                desc.wo, desc.bo = p.out_weights
                desc.per_task, desc.scratch, desc.work = p.per_task, p.scratch.data_ptr(), p.work.data_ptr()
            else:
                desc.kind = 1
                (desc.norm_w, _, _, desc.mode, desc.keep_count, desc.wg, desc.wu, desc.F, desc.wt, desc.in8,
                 desc.in8_rows, desc.in8_scale, desc.in4, desc.in4_sz, desc.group, desc.h) = p.input_args
                desc.wd, desc.out8, desc.out8_scale, desc.out4, desc.out4_sz, _ = p.output_args
                desc.pre, desc.hid, desc.sel, desc.work = (p.pre.data_ptr(), p.hid.data_ptr(), p.sel.data_ptr(),
                                                           p.work.data_ptr())
        if head_dim is None:
            return cpu_block.Plan(inputs, statics, key, descs=None)
        B, _, d = x.shape
        mlp_plans = [b._plan for b in self.blocks if isinstance(b, cpu_block.MlpBlock)]
        # a mixed step's kernels: those every MLP block has in C
        modes = {kern: m for kern, m in mlp_plans[0].modes.items() if all(p.modes.get(kern) == m for p in mlp_plans)} \
            if mlp_plans else {}
        return cpu_block.Plan(inputs, tuple(sorted(used)), key, descs=descs, lib=lib, x_shape=x.shape, B=B, d=d,
                              head_dim=head_dim, modes=modes, buf=torch.empty(2 * B * d, dtype=_F32),
                              row_buf=torch.empty(2 * B * d, dtype=_F32),
                              block_plans=[b._plan for b in self.blocks])  # keeps the buffers the descriptors point at


def _used_roles(block, plan) -> tuple[str, ...]:
    """The inputs a block's C call reads through its plan's pointers."""
    if isinstance(block, cpu_block.AttentionBlock):
        return cpu_block.AttentionBlock.STATIC
    return ("w_norm", "wg", "wu", "wd", *("pack:" + c for c in plan.reads))


def chains(gm: fx.GraphModule) -> list[BlockChain]:
    return [n.target for n in gm.graph.nodes if n.op == "call_function" and isinstance(n.target, BlockChain)]


def _is_block(node) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function"
            and isinstance(node.target, (cpu_block.AttentionBlock, cpu_block.MlpBlock)))


def fuse(graph: fx.Graph) -> int:
    """Replace every run of two or more blocks, each the only user of the previous one's output and that
    as its x, by one chain node (its attention blocks sharing cos, sin, positions and keep, every norm's
    mean of squares the block's own); returns how many chains."""
    runs, seen = [], set()
    for node in graph.nodes:
        if not _is_block(node) or node in seen or node.target.roles["ms"] is not None:
            continue
        run = [node]
        while len(run[-1].users) == 1:
            nxt = next(iter(run[-1].users))
            if not (_is_block(nxt) and nxt.target.roles["ms"] is None
                    and nxt.args[nxt.target.roles["x"]] is run[-1]
                    and sum(a is run[-1] for a in nxt.args) == 1 and _shares_step_inputs(run + [nxt])):
                break
            run.append(nxt)
        seen.update(run)
        if len(run) >= 2 and any(isinstance(n.target, cpu_block.AttentionBlock) for n in run):
            runs.append(run)
    for run in runs:
        inside, inputs = set(run), []
        for n in run:
            for a in n.args:
                if isinstance(a, fx.Node) and a not in inside and a not in inputs:
                    inputs.append(a)
        index = {a: j for j, a in enumerate(inputs)}  # cpu_block.fuse passes nodes only
        maps = [tuple(-1 if a in inside else index[a] for a in n.args) for n in run]
        chain = BlockChain([n.target for n in run], maps, len(inputs))
        with graph.inserting_before(run[-1]):
            new = graph.call_function(chain, tuple(inputs))
        new.meta = dict(run[-1].meta)
        run[-1].replace_all_uses_with(new)
        for n in reversed(run):
            graph.erase_node(n)
    return len(runs)


def _shares_step_inputs(run: list[fx.Node]) -> bool:
    attn = [n for n in run if isinstance(n.target, cpu_block.AttentionBlock)]
    return not attn or all(n.args[n.target.roles[r]] is attn[0].args[attn[0].target.roles[r]] for n in attn[1:] for r in _SHARED)
