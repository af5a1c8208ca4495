"""A decoder layer's attention block and MLP block of a CPU decode step, each one C call (cpu_block.c),
for the eager CPU program.

Why: a SmolLM2 decode step streams ~540 MB of weights, which evicts the Python interpreter's and
torch's working set from every cache level; the ~25 ops between two layers' weight reads then run
cold, several times slower than in a warm loop (a linear wrapper: ~15 us warm, ~150 us after a 64 MB
sweep). Running each block from its RMSNorm to its residual add as one C call removes them.

`fuse(graph)` finds, around every `solc::attention` call of HF's llama-style layers (after
cpu_rotary.fuse):

    h = w_norm * (x * rsqrt(ms + eps))            ms = mean(x ** 2): computed in C in aten's summation
                                                  order where that was checked to give torch's bits
    q = rotary(transpose(view(linear(h, Wq, bq))))   and k alike, with one cos/sin pair
    v = transpose(view(linear(h, Wv, bv)))
    a = attention(q, k, v, caches, positions, keep, scale)
    out = x + linear(reshape(transpose(reshape(a))), Wo, bo)

and replaces it with one `AttentionBlock` call; and around every gated `solc::mlp` call in weight-quant
mode, `x + mlp(w_norm * (x * rsqrt(ms + eps)))`, with one `MlpBlock` call (the SiLU in C where aten's
AVX-512 kernel is reproduced, else torch's between two C calls). The C path runs the same C kernels the op-by-op
program calls, on the same values, and the norm's elementwise fp32 operations in the graph's order, so
the step keeps its bits (tests/runtime/test_cpu_program.py). Any other call (prefill, fp64, bf16,
non-contiguous caches, no compiler, SOLC_CPU_FAST=0) runs the matched nodes themselves, kept as a
small GraphModule.
"""
from __future__ import annotations

import ctypes
import operator
import os
import weakref
from typing import Optional

import torch
import torch.fx as fx
from torch import Tensor

from runtime.ops import cpu_attention, cpu_linear, cpu_mlp, cpu_rotary, library, mlp_weights, reference, step_hints
from runtime.ops.reference import PAGE_SIZE

_ATEN = torch.ops.aten
_F32 = torch.float32


class Plan:
    """What a block (or a block chain, cpu_chain.py) checked and computed on its first call with a set of
    weights and caches: their arguments of the C call. `matches` re-checks only that the same tensors
    came over the same memory: the ids and data pointers of the `static` inputs (indices into the
    node's inputs), with weak references whose callbacks mark the plan dead when one of those tensors is
    freed (a dropped cache is neither kept alive nor mistaken for a new tensor at its id); a weight given
    new data, say by `.to()`, is re-planned. The per-step inputs are checked on every call. Why: the
    checks ran cold at every layer (the weights' stream evicts them from the caches), ~100 us a block
    with per-tensor Python checks."""

    def __init__(self, inputs, static: tuple[int, ...], key=None, **args):
        self._static = operator.itemgetter(*static) if len(static) > 1 else (lambda s: tuple(s[i] for i in static))
        tensors = self._static(inputs)
        alive = self._alive = [True]
        kill = lambda _ref: alive.__setitem__(0, False)  # noqa: E731
        self._refs = [weakref.ref(t, kill) for t in tensors]
        self._ids, self._ptrs = tuple(map(id, tensors)), tuple(map(Tensor.data_ptr, tensors))
        self.key = key
        self.__dict__.update(args)

    def matches(self, inputs, key=None) -> bool:
        if not (self._alive[0] and key == self.key):
            return False
        tensors = self._static(inputs)
        return tuple(map(id, tensors)) == self._ids and tuple(map(Tensor.data_ptr, tensors)) == self._ptrs


def step_inputs_fit(plan: Plan, head_dim: int, x: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether a step's x and rotary cos / sin are what an attention plan's C call takes."""
    return (x.shape == plan.x_shape and x.dtype is _F32 and x.is_contiguous() and cos.dtype is _F32
            and sin.dtype is _F32 and cos.shape == sin.shape and cos.stride() == sin.stride() and cos.dim() == 4
            and cos.shape[1:] == (1, 1, head_dim) and cos.shape[0] in (1, plan.B) and cos.stride(3) == 1)


def step_pages(keep: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """The step's positions and kept page counts (0: every visible page) as the C attention reads them."""
    keeps, pos = cpu_attention.host_levels(keep, positions, step_hints.current())
    kept = torch.tensor([cpu_attention._kept_page_count(p, k) or 0 for p, k in zip(pos, keeps)], dtype=torch.int64)
    return torch.tensor(pos, dtype=torch.int64), kept


class _Block:
    """A fused node's target: the C block where it applies (`_c_block` returns its output), else the
    matched nodes (`fallback`). `roles` maps each named input to its index among the node's inputs."""

    def __init__(self, name: str, fallback: fx.GraphModule, roles: dict[str, Optional[int]], eps: float):
        self.__name__ = name  # for FX's code generation
        self.fallback, self.roles, self.eps = fallback, roles, eps
        self._plan: Optional[Plan] = None

    def __call__(self, *inputs):
        out = self._c_block(inputs)
        return self.fallback(*inputs) if out is None else out

    def _c_block(self, inputs) -> Optional[Tensor]:
        raise NotImplementedError


class AttentionBlock(_Block):
    STATIC = ("w_norm", "wq", "wk", "wv", "wo", "bq", "bk", "bv", "bo", "k_cache", "v_cache", "page_min", "page_max")
    DYNAMIC = ("x", "ms", "cos", "sin", "positions", "keep")  # read anew at every step

    def __init__(self, fallback: fx.GraphModule, roles: dict[str, Optional[int]], eps: float, scale: float,
                 head_dim: int):
        super().__init__("attention_block", fallback, roles, eps)
        self.scale, self.head_dim = scale, head_dim

    def _c_block(self, inputs) -> Optional[Tensor]:
        if not cpu_attention.C_KERNEL or not library.cpu_fast_paths():
            return None
        plan = self._plan
        if plan is None or not plan.matches(inputs):
            plan = self._plan = self._make_plan(inputs)
            if plan is None:
                return None
        r = self.roles
        x, cos, sin = inputs[r["x"]], inputs[r["cos"]], inputs[r["sin"]]
        if not step_inputs_fit(plan, self.head_dim, x, cos, sin):
            return None
        ms = _mean_of_squares(x, inputs, r["ms"], plan.c_mean)
        if ms is False:
            return None
        pos, kept = step_pages(inputs[r["keep"]], inputs[r["positions"]])
        out = torch.empty(plan.x_shape, dtype=_F32)
        plan.lib.solc_attention_block(
            x.data_ptr(), _ptr(ms), self.eps, *plan.weights, cos.data_ptr(), sin.data_ptr(),
            cos.stride(0) if cos.shape[0] > 1 else 0, *plan.caches, pos.data_ptr(), kept.data_ptr(), *plan.dims,
            self.scale, *plan.out_weights, out.data_ptr(), plan.work.data_ptr(), plan.scratch.data_ptr(),
            plan.per_task, torch.get_num_threads())
        return out

    def _make_plan(self, inputs) -> Optional[Plan]:
        lib = cpu_linear._library or cpu_linear.library()
        if lib is None:
            return None
        a = {role: (inputs[i] if i is not None else None) for role, i in self.roles.items()}
        x, D = a["x"], self.head_dim
        if not (_f32(x) and x.dim() == 3 and x.shape[1] == 1):
            return None
        B, _, d = x.shape
        wq, wk, wv, wo = a["wq"], a["wk"], a["wv"], a["wo"]
        nq, nkv = wq.shape[0], wk.shape[0]
        Hq, Hkv = nq // D, nkv // D
        if not (all(_f32(w) and w.dim() == 2 for w in (wq, wk, wv, wo)) and wq.shape[1] == wk.shape[1] == wv.shape[1] == d
                and wv.shape[0] == nkv and tuple(wo.shape) == (d, nq) and nq % D == 0 and nkv % D == 0 and Hkv
                and Hq % Hkv == 0 and _f32(a["w_norm"]) and a["w_norm"].numel() == d
                and all(b is None or (_f32(b) and b.numel() == n)
                        for b, n in ((a["bq"], nq), (a["bk"], nkv), (a["bv"], nkv), (a["bo"], d)))):
            return None
        kc, vc, pmin, pmax = a["k_cache"], a["v_cache"], a["page_min"], a["page_max"]
        if not all(_f32(t) and t.dim() == 4 for t in (kc, vc, pmin, pmax)):
            return None
        S, P = kc.shape[2], pmin.shape[2]
        if not (tuple(kc.shape) == tuple(vc.shape) == (B, Hkv, S, D) and S >= PAGE_SIZE
                and tuple(pmin.shape) == tuple(pmax.shape) == (B, Hkv, P, D)):
            return None
        if B == 1:  # the one-row GEMV's packed copies (cpu_linear.c)
            for w in (wq, wk, wv, wo):
                cpu_linear.ensure_packed(w)
        per_task = lib.solc_decode_attention_scratch(Hq // Hkv, S, P, D)
        static = tuple(self.roles[n] for n in self.STATIC if self.roles[n] is not None)
        return Plan(inputs, static, lib=lib, B=B, x_shape=x.shape, per_task=per_task, c_mean=_aten_mean_in_c(lib, d),
                     weights=(a["w_norm"].data_ptr(), B, d, wq.data_ptr(), _ptr(a["bq"]), wk.data_ptr(), _ptr(a["bk"]),
                              wv.data_ptr(), _ptr(a["bv"])),
                     caches=(kc.data_ptr(), vc.data_ptr(), pmin.data_ptr(), pmax.data_ptr()),
                     dims=(Hq, Hkv, S, P, D), out_weights=(wo.data_ptr(), _ptr(a["bo"])),
                     scratch=torch.empty(B * Hkv * per_task, dtype=_F32),
                     work=torch.empty(B * (d + 3 * nq + 4 * nkv), dtype=_F32))


_BF16 = torch.bfloat16
# solc_mlp_input's modes by (bit level, row skip?); 4 bits: the norm in C, torch's int4 kernel after it, or
# mode 5 (cpu_mlp.c's int4 kernel inside the C calls) where that kernel is built
_MLP_MODES = {(16, False): 0, (16, True): 1, (8, False): 2, (8, True): 3, (4, False): 4}
# an MLP block plan key: no action for every row; each step's rows run in their kernel groups (cpu_chain.py)
MIXED_ROWS = "mixed rows"
# the copies each mode reads, with their dtypes
_COPY_DTYPES = {"wt": _F32, "in8": torch.int8, "in8_scale": _BF16, "in8_rows": torch.uint8, "out8": torch.int8,
                "out8_scale": _BF16, "in4": torch.uint8, "in4_sz": _BF16, "out4": torch.uint8, "out4_sz": _BF16}


class MlpBlock(_Block):
    """A layer's MLP block, `x + mlp(rmsnorm(x))`, for gated MLPs without biases in weight-quant mode: where
    every row runs one action (the step's hints), C with the kernels cpu_mlp.py would pick, on the same
    values (one call where the SiLU runs in C, else two around torch's); else the matched nodes."""
    DYNAMIC = ("x", "ms", "keep", "bits")  # read anew at every step; the other inputs are weights and copies

    def __init__(self, fallback: fx.GraphModule, roles: dict[str, Optional[int]], eps: float, act: str,
                 group_size: int):
        super().__init__("mlp_block", fallback, roles, eps)
        self.act, self.group_size = act, group_size

    def _c_block(self, inputs) -> Optional[Tensor]:
        hints = step_hints.current()
        if hints is None or hints.mlp is None or hints.bits is None or not library.cpu_fast_paths():
            return None
        key = (hints.mlp, hints.bits)
        plan = self._plan
        if plan is None or not plan.matches(inputs, key):
            plan = self._plan = self._make_plan(inputs, key)
            if plan is None:
                return None
        x = inputs[self.roles["x"]]
        if not (x.shape == plan.x_shape and x.dtype is _F32 and x.is_contiguous()):
            return None
        ms = _mean_of_squares(x, inputs, self.roles["ms"], plan.c_mean)
        if ms is False:
            return None
        B, d, F, mode, lib = plan.B, plan.d, plan.F, plan.mode, plan.lib
        if plan.fused_silu:  # the whole block, activation included, in one C call
            out = torch.empty(plan.x_shape, dtype=_F32)
            if not lib.solc_mlp_block(x.data_ptr(), _ptr(ms), self.eps, *plan.input_args, *plan.output_args[:5],
                                      plan.pre.data_ptr(), plan.hid.data_ptr(), plan.sel.data_ptr(),
                                      plan.work.data_ptr(), out.data_ptr(), torch.get_num_threads()):
                return out
        pre = plan.pre  # consumed within this call
        if lib.solc_mlp_input(x.data_ptr(), _ptr(ms), self.eps, *plan.input_args, pre.data_ptr(),
                              plan.sel.data_ptr(), plan.work.data_ptr(), torch.get_num_threads()):
            return None
        if mode == 4:  # torch's int4 kernel, as cpu_mlp runs it
            pre = cpu_mlp._input_projection(plan.h, [plan.keep] * B, 4, False, plan.w_in, [None, None], "gated",
                                            plan.copies, self.group_size)
        hid = reference._hidden(pre, "gated", plan.fn)
        if mode == 4:
            y = cpu_mlp._down(hid, 4, plan.wd, None, plan.copies, self.group_size)
            return torch.add(x, y.view(B, 1, d))
        out = torch.empty(plan.x_shape, dtype=_F32)
        hid = hid.contiguous()
        if lib.solc_mlp_output(hid.data_ptr(), B, F, mode, *plan.output_args, x.data_ptr(), d, out.data_ptr(),
                               plan.work.data_ptr(), torch.get_num_threads()):
            return None
        return out

    def _make_plan(self, inputs, key) -> Optional[Plan]:
        lib = cpu_linear._library or cpu_linear.library()
        a = {role: (inputs[i] if i is not None else None) for role, i in self.roles.items()}
        x, wg, wu, wd = a["x"], a["wg"], a["wu"], a["wd"]
        if lib is None or not (_f32(x) and x.dim() == 3 and x.shape[1] == 1 and x.shape[0] <= cpu_mlp.MAX_ROWS):
            return None
        B, _, d = x.shape
        F = wg.shape[0]
        if not (_f32(a["w_norm"]) and a["w_norm"].numel() == d and all(_f32(w) for w in (wg, wu, wd))
                and tuple(wg.shape) == tuple(wu.shape) == (F, d) and tuple(wd.shape) == (d, F)):
            return None
        c = mlp_weights.unpack([a.get("pack:" + f) for f in mlp_weights.PACK_FIELDS])
        # the C modes whose copies this layer has: a mixed batch's kernel groups may run any of them
        modes = {kern: self._c_mode(kern) for kern in _MLP_MODES if all(c[n] is not None for n in cpu_mlp._needs(*kern))}
        if key == MIXED_ROWS:  # planned as dense; every step passes each group's mode and keep counts
            keep, level, row_skip = 1.0, 16, False
            modes = {kern: m for kern, m in modes.items() if m != 4}  # torch's int4 kernel runs outside the C
            reads = tuple(dict.fromkeys(n for kern in modes for n in cpu_mlp._needs(*kern)))
        else:
            keep, level = float(key[0]), min(int(key[1]), 16)
            row_skip = cpu_mlp.row_skips(level, [keep] * B)
            reads = cpu_mlp._needs(level, row_skip) if (level, row_skip) in _MLP_MODES else ()
        mode = modes.get((level, row_skip))
        if mode is None:
            return None
        if mode == 2 and c["in8_rows"] is not None:  # mode 2 runs the in8_rows kernel where it exists (a mixed
            reads += ("in8_rows",)                    # plan's reads have it already, from mode 3's needs)
        if any(c[name] is not None and not (c[name].dtype == dtype and c[name].is_contiguous())
               for name, dtype in _COPY_DTYPES.items()):
            return None
        if B == 1:  # the one-row GEMV's packed copies (cpu_linear.c), for the fp32 weights the mode reads
            for w in ((wg, wu, wd) if mode == 0 else (wd,) if mode == 1 else (c["out8"],) if mode in (2, 3) else ()):
                if w is not None:
                    cpu_linear.ensure_packed(w)
        if 5 in modes.values():  # the int4 kernel's stream-ordered copies (cpu_mlp.c), read at any batch
            for w in ("in4", "out4"):
                cpu_linear.ensure_packed(c[w], c[w + "_sz"], self.group_size)
        ptr = lambda name: _ptr(c[name])  # noqa: E731
        h = torch.empty(B, d, dtype=_F32)
        static = tuple(i for r, i in self.roles.items() if i is not None and r not in self.DYNAMIC)
        fused_silu = self.act == "silu" and mode != 4 and F % 32 == 0 and _aten_silu_in_c(lib)
        return Plan(inputs, static, key, lib=lib, B=B, d=d, F=F, mode=mode, modes=modes, keep=keep, x_shape=x.shape, h=h,
                     c_mean=_aten_mean_in_c(lib, d),
                     fused_silu=fused_silu, pre=torch.empty(B, 2 * F, dtype=_F32), hid=torch.empty(B, F, dtype=_F32),
                     w_in=[wg, wu], wd=wd, copies=c, reads=reads, fn=reference._activation(self.act),
                     input_args=(a["w_norm"].data_ptr(), B, d, mode, reference.keep_count(keep, d), wg.data_ptr(),
                                 wu.data_ptr(), F, ptr("wt"), ptr("in8"), ptr("in8_rows"), ptr("in8_scale"),
                                 ptr("in4"), ptr("in4_sz"), self.group_size, h.data_ptr()),
                     output_args=(wd.data_ptr(), ptr("out8"), ptr("out8_scale"), ptr("out4"), ptr("out4_sz"),
                                  self.group_size),
                     sel=torch.empty(B * d + 2 * B + 1 + d, dtype=torch.int64),
                     work=torch.empty(B * d + 2 * B * F, dtype=_F32))


    def _c_mode(self, kern: tuple[int, bool]) -> int:
        """solc_mlp_input's mode for a kernel (bit level, row skip?) of cpu_mlp.py."""
        mode = _MLP_MODES[kern]
        if mode == 4 and cpu_mlp.int4_kernel() and self.group_size % 8 == 0:
            return 5  # cpu_mlp.c's int4 kernel, called from the block's C
        return mode


def _mean_of_squares(x: Tensor, inputs, index: Optional[int], in_c: bool):
    """The block's mean of squares: None (the C computes it, in aten's order), the graph's value (index: an
    input of the block) or torch's own ops on x (the graph's ops: the same bits); False where unusable."""
    if index is not None:
        ms = inputs[index]
        return ms if ms.dtype is _F32 and ms.is_contiguous() and ms.numel() == x.shape[0] else False
    return None if in_c else torch.mean(torch.pow(x, 2), [-1], True)


def _ptr(t: Optional[Tensor]):
    return None if t is None else t.data_ptr()


_MEAN_IN_C: dict[int, bool] = {}


def _aten_mean_in_c(lib, d: int) -> bool:
    """Whether cpu_block.c's mean of squares gives torch.mean(torch.pow(x, 2), -1)'s bits for rows of d
    (checked once per d on rows over many scales; aten splits rows of 32768 or more over threads)."""
    if d not in _MEAN_IN_C:
        ok = 8 <= d < 32768
        if ok:
            g = torch.Generator().manual_seed(d)
            x = torch.cat([torch.randn(4, d, generator=g) * 10.0 ** e for e in range(-3, 4)]).contiguous()
            x[0, :3] = torch.tensor([0.0, -0.0, 1e-30])
            got, sq = torch.empty(x.shape[0]), torch.empty(d)
            lib.solc_mean_of_squares(x.data_ptr(), x.shape[0], d, got.data_ptr(), sq.data_ptr())
            ok = torch.equal(got, torch.mean(torch.pow(x, 2), [-1], True).view(-1))
        _MEAN_IN_C[d] = ok
    return _MEAN_IN_C[d]


_SILU_IN_C: Optional[bool] = None


def _aten_silu_in_c(lib) -> bool:
    """Whether cpu_block.c's silu(gate) * up gives aten's bits here: on AVX-512 kernels aten's SiLU is
    x / (1 + Sleef_expf16_u10(-x)); libtorch exports that function, so the C code calls it. Checked once
    against torch on values over the whole range (else the MLP block runs torch's activation)."""
    global _SILU_IN_C
    if _SILU_IN_C is None:
        _SILU_IN_C = False
        try:
            if torch.backends.cpu.get_cpu_capability() in ("AVX512", "AVX512_BF16", "AMX"):
                libtorch = ctypes.CDLL(os.path.join(os.path.dirname(torch.__file__), "lib", "libtorch_cpu.so"))
                lib.solc_set_expf16(ctypes.cast(libtorch.Sleef_expf16_u10, ctypes.c_void_p).value)
                g = torch.Generator().manual_seed(0)
                pre = torch.cat([torch.randn(2, 1024, generator=g) * 12, torch.linspace(-100, 100, 2048).view(2, 1024)])
                pre[0, :8] = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), float("nan"), 88.0, -88.0, 1e-30])
                gate, up = pre.chunk(2, -1)
                hid = torch.empty(4, 512)
                lib.solc_silu_mul(pre.data_ptr(), 4, 512, hid.data_ptr())
                _SILU_IN_C = _nan_equal(hid, torch.nn.functional.silu(gate) * up)
        except (OSError, AttributeError):
            _SILU_IN_C = False
    return _SILU_IN_C


def _nan_equal(a: Tensor, b: Tensor) -> bool:
    return bool(((a == b) | (a.isnan() & b.isnan())).all())


def blocks(gm: fx.GraphModule) -> list:
    """The fused blocks (AttentionBlock, MlpBlock) of a program, in graph order (those inside a block
    chain, cpu_chain.py, included)."""
    found = []
    for n in gm.graph.nodes:
        if n.op == "call_function":
            found.extend(getattr(n.target, "blocks", [n.target] if isinstance(n.target, _Block) else []))
    return found


def _f32(t) -> bool:
    return isinstance(t, Tensor) and t.dtype is _F32 and t.is_contiguous() and t.device.type == "cpu"


def fuse(graph: fx.Graph) -> int:
    """Replace every matched attention block and MLP block (module doc) by one block node; returns how many."""
    order = {n: i for i, n in enumerate(graph.nodes)}
    fused = 0
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is library.attention_impl:
            match, make = _match(node), AttentionBlock
        elif node.target is cpu_mlp.mlp_cpu:
            match, make = _match_mlp(node), MlpBlock
        else:
            continue
        if match is None:
            continue
        nodes, final, roles, *settings = match
        nodes = sorted(nodes, key=order.__getitem__)
        if any(u not in nodes for n in nodes if n is not final for u in n.users):
            continue  # an intermediate value is used outside the block
        fallback, inputs = _subgraph(nodes, final)
        index = {n: i for i, n in enumerate(inputs)}
        block = make(fallback, {r: (index[n] if n is not None else None) for r, n in roles.items()}, *settings)
        with graph.inserting_before(final):
            new = graph.call_function(block, tuple(inputs))
        new.meta = dict(final.meta)
        final.replace_all_uses_with(new)
        for n in reversed(nodes):
            graph.erase_node(n)
        fused += 1
    return fused


def _subgraph(nodes: list[fx.Node], final: fx.Node) -> tuple[fx.GraphModule, list[fx.Node]]:
    """The matched nodes as a GraphModule over their outside inputs (in first-use order)."""
    inside, inputs = set(nodes), []
    for n in nodes:
        for a in n.all_input_nodes:
            if a not in inside and a not in inputs:
                inputs.append(a)
    sub = fx.Graph()
    env = {a: sub.placeholder(f"input_{i}") for i, a in enumerate(inputs)}
    for n in nodes:
        env[n] = sub.node_copy(n, env.__getitem__)
    sub.output(env[final])
    return fx.GraphModule(torch.nn.Module(), sub, class_name="AttentionBlockOps"), inputs


def _call(node, target, nargs=None) -> bool:
    return (isinstance(node, fx.Node) and node.op == "call_function" and node.target is target and not node.kwargs
            and (nargs is None or len(node.args) == nargs))


def _other(node: fx.Node, known) -> Optional[fx.Node]:
    """The argument of a two-argument node that is not `known` (None where neither or both are)."""
    a, b = node.args
    if a is known and b is not known:
        return b
    if b is known and a is not known:
        return a
    return None


def _projection(t):
    """(linear node, view node, weight, bias, head dim) of transpose(view(linear(h, W, b), [.., .., -1, D]), 1, 2)."""
    if not _call(t, _ATEN.transpose.int, 3) or tuple(t.args[1:]) != (1, 2):
        return None
    view = t.args[0]
    if not _call(view, _ATEN.view.default, 2) or not isinstance(view.args[1], (list, tuple)) or len(view.args[1]) != 4:
        return None
    shape, lin = view.args[1], view.args[0]
    if shape[2] != -1 or not isinstance(shape[3], int) or not _call(lin, cpu_linear.linear_cpu, 3):
        return None
    h, w, b = lin.args
    if not isinstance(w, fx.Node) or w.op != "get_attr" or not (b is None or (isinstance(b, fx.Node) and b.op == "get_attr")):
        return None
    return lin, view, h, w, b, shape[3]


def _norm(h):
    """(nodes, x, ms, w_norm, eps) of h = mul(w_norm, mul(x, rsqrt(add(ms, eps)))) (either operand order);
    where ms = mean(pow(x, 2), [-1], True) those two nodes are the block's as well and ms is None."""
    if not _call(h, _ATEN.mul.Tensor, 2):
        return None
    for w, scaled in (h.args, h.args[::-1]):
        if not (isinstance(w, fx.Node) and w.op == "get_attr" and _call(scaled, _ATEN.mul.Tensor, 2)):
            continue
        for x, r in (scaled.args, scaled.args[::-1]):
            if not (_call(r, _ATEN.rsqrt.default, 1) and _call(r.args[0], _ATEN.add.Tensor, 2)):
                continue
            s = r.args[0]
            ms, eps = s.args
            if isinstance(ms, fx.Node) and isinstance(eps, float) and isinstance(x, fx.Node):
                sq = ms.args[0] if _call(ms, _ATEN.mean.dim, 3) else None
                if (sq is not None and list(ms.args[1]) == [-1] and ms.args[2] is True
                        and _call(sq, _ATEN.pow.Tensor_Scalar, 2) and sq.args[0] is x and sq.args[1] == 2):
                    return [sq, ms, s, r, scaled, h], x, None, w, eps  # the mean of squares is the block's too
                return [s, r, scaled, h], x, ms, w, eps
    return None


def _match(attn: fx.Node):
    """(nodes, final add, roles, eps, scale, head dim) of the block around `attn`, else None."""
    if attn.kwargs or len(attn.args) != 10 or not isinstance(attn.args[9], float):
        return None
    q, k, v, k_cache, v_cache, page_min, page_max, positions, keep, scale = attn.args
    if not (_call(q, cpu_rotary.rotary, 3) and _call(k, cpu_rotary.rotary, 3) and q.args[1:] == k.args[1:]):
        return None
    pq, pk, pv = _projection(q.args[0]), _projection(k.args[0]), _projection(v)
    if pq is None or pk is None or pv is None or not (pq[2] is pk[2] is pv[2]) or not (pq[5] == pk[5] == pv[5]):
        return None
    norm = _norm(pq[2])
    if norm is None:
        return None
    norm_nodes, x, ms, w_norm, eps = norm
    D = pq[5]
    # the output side: reshape(a, [B, -1, T, D]) -> transpose(1, 2) -> reshape([B, T, -1]) -> linear -> add(x, .)
    chain, node = [], attn
    for target, nargs in ((_ATEN.reshape.default, 2), (_ATEN.transpose.int, 3), (_ATEN.reshape.default, 2)):
        if len(node.users) != 1:
            return None
        user = next(iter(node.users))
        if not _call(user, target, nargs) or user.args[0] is not node:
            return None
        chain.append(user)
        node = user
    r1, tr, r2 = chain
    if not (len(r1.args[1]) == 4 and r1.args[1][1] == -1 and r1.args[1][3] == D and tuple(tr.args[1:]) == (1, 2)
            and len(r2.args[1]) == 3 and r2.args[1][2] == -1 and len(r2.users) == 1):
        return None
    out = next(iter(r2.users))
    if not _call(out, cpu_linear.linear_cpu, 3) or out.args[0] is not r2 or len(out.users) != 1:
        return None
    wo, bo = out.args[1], out.args[2]
    if not (isinstance(wo, fx.Node) and wo.op == "get_attr") or not (bo is None or (isinstance(bo, fx.Node) and bo.op == "get_attr")):
        return None
    final = next(iter(out.users))
    if not _call(final, _ATEN.add.Tensor, 2) or _other(final, out) is not x:
        return None
    nodes = norm_nodes + [pq[0], pq[1], q.args[0], q, pk[0], pk[1], k.args[0], k, pv[0], pv[1], v, attn, r1, tr, r2,
                          out, final]
    roles = dict(x=x, ms=ms, w_norm=w_norm, wq=pq[3], bq=pq[4], wk=pk[3], bk=pk[4], wv=pv[3], bv=pv[4], cos=q.args[1],
                 sin=q.args[2], k_cache=k_cache, v_cache=v_cache, page_min=page_min, page_max=page_max,
                 positions=positions, keep=keep, wo=wo, bo=bo)
    if not all(isinstance(n, fx.Node) for r, n in roles.items() if r not in ("ms", "bq", "bk", "bv", "bo")):
        return None
    return nodes, final, roles, eps, scale, D


def _match_mlp(mlp: fx.Node):
    """(nodes, final add, roles, eps, act, group size) of `x + mlp(rmsnorm(x))` around the solc::mlp call
    `mlp` for a gated MLP without biases in weight-quant mode, else None."""
    if mlp.kwargs or len(mlp.args) != 12:
        return None
    h, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size = mlp.args
    if not (kind == "gated" and quant == "weight" and isinstance(act, str) and isinstance(group_size, int)
            and isinstance(w_in, (list, tuple)) and len(w_in) == 2 and list(b_in) == [None, None] and b_out is None
            and isinstance(packs, (list, tuple)) and len(packs) == len(mlp_weights.PACK_FIELDS)):
        return None
    if not all(isinstance(w, fx.Node) and w.op == "get_attr" for w in (*w_in, w_out)):
        return None
    if not all(p is None or (isinstance(p, fx.Node) and p.op == "get_attr") for p in packs):
        return None
    norm = _norm(h)
    if norm is None or len(mlp.users) != 1:
        return None
    norm_nodes, x, ms, w_norm, eps = norm
    final = next(iter(mlp.users))
    if not _call(final, _ATEN.add.Tensor, 2) or _other(final, mlp) is not x:
        return None
    roles = dict(x=x, ms=ms, w_norm=w_norm, keep=keep, bits=bits, wg=w_in[0], wu=w_in[1], wd=w_out)
    roles.update({"pack:" + f: p for f, p in zip(mlp_weights.PACK_FIELDS, packs)})
    if not all(isinstance(n, fx.Node) for r, n in roles.items() if not r.startswith("pack:") and r != "ms"):
        return None
    return norm_nodes + [mlp, final], final, roles, eps, act, group_size
