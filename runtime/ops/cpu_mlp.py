"""The CPU implementation of `solc::mlp` for decode steps (T == 1, any batch, in calls of at most 16
rows): each row reads only what its action keeps. `reference.mlp` is the definition; every path here
equals it up to summation order.

Per row action (mlp keep k, bits b); the rows of a bit level run together:
  k = 1, b = 16      runtime.ops.cpu_linear (the dense action pays for no selection)
  k < 1, b = 16      gate/up: a row-skipping GEMV over the rows of W_in^T (`wt`) at the row's kept
                     channels (cpu_mlp.c; F.embedding_bag without a compiler), or the dense kernel on
                     the pruned input (`row_skips` picks by bytes); down: cpu_linear
  b = 8, k = 1       gate/up: cpu_mlp.c's int8 row kernel over every row of `in8_rows` where the copies
                     have them (the mlp axis is on: one fmaf chain per output, the row skip's bits), else
                     its int8 linear (16-lane fixed order); down: the int8 linear; bf16-rounded
                     activations; torch._weight_int8pack_mm where the C kernels cannot be built
  b = 8, k < 1       gate/up: the int8 row-skipping GEMV over `in8_rows` (uint8 rows, row scale 1 and
                     bias -128, so a row is its int8 values exactly; cpu_mlp.c, FBGEMM's byte-rowwise
                     embedding_bag without a compiler), per-output-channel scale after the sum; down:
                     the int8 linear
  b = 4              cpu_mlp.c's int4 linear (AVX-512 BF16: per group scale * sum(x (q - 8)) + zero * sum(x)
                     with exact bf16 products) on the pruned input, torch._weight_int4pack_mm_for_cpu
                     elsewhere (no row-skipping int4 kernel: pruning saves nothing at 4 bits here)
  activation mode    the 16-bit paths above, then the reference fake quantizer
The C row skips sum each output in the order of their dense pass (a dropped channel is a zero term the
dense pass adds exactly), so row skip and dense pass give a row the same bits, and a call picks the
cheaper. fp32: a level's rows take one dense pass on their pruned inputs (W_in read once) when one of
them is dense or their row skips together would read more than ROW_SKIP_MAX_KEEP of W_in; else each row
skips (at batch 1: keep <= that limit). int8: every group with a pruned row runs the row kernel, each row
over its kept rows (a dense row over all): its chunks of outputs walk every row of the call, so at batch
> 1 a chunk's weights come from DRAM once, and it is never slower than its dense pass. Without the C
kernels (embedding_bag sums in another order) each action keeps its batch-of-one kernel.
Every reduction of a row runs over that row alone in a fixed order (the C kernels by construction;
embedding_bag sums each bag on its own; both int4 kernels reduce each row alike whatever the row count),
so a row's MLP output does not depend on its batch mates (fp32 and, in weight mode, the low-bit paths).
Prefill / teacher forcing (T > 1) runs the reference one batch row at a time. Other inputs (float64,
mismatched dtypes, missing copies) run the reference.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from runtime.ops import cpu_linear, library, mlp_weights, quant_primitives, reference, step_hints

MAX_ROWS = 16
DTYPES = (torch.float32, torch.bfloat16)


# Above this keep fraction the row-skipping GEMV reads little less than the dense kernel and loses to it:
# such rows run the dense kernel of their bit level on the pruned input, which is exactly the reference
# too. With embedding_bag, keep 0.8 ran at 1.19x F.linear (benchmarks/mlp_cpu.py, SmolLM2 shapes, 1
# thread, AVX-512 machine); cpu_mlp.c's row skip runs keep 0.8 at ~0.71 of the fixed-order dense GEMV
# (AVX2 machine, 2026-12-02), so 0.8 row-skips too.
ROW_SKIP_MAX_KEEP = 0.8


def kept_channels(x: Tensor, keep: float) -> Tensor:
    """[m, k] indices of each row's kept channels: the reference's top-|x| rule, ties to the lower index."""
    d = x.shape[-1]
    k = reference.keep_count(keep, d)
    a = x.abs()
    top = torch.topk(a, k, dim=-1)
    threshold = top.values[:, -1:]
    if bool(((a >= threshold).sum(dim=-1) == k).all()):  # no tie straddles the cut: topk's set is the set
        return top.indices
    return torch.sort(a, dim=-1, descending=True, stable=True).indices[:, :k]


def _kept(x: Tensor, keeps: list[float]) -> tuple[Tensor, Tensor]:
    """(kept channel indices of every row, flat int64; offsets [m + 1]): row i of x [m, d] keeps its
    keep_count(keeps[i], d) largest |x| (ties to the lower index), in ascending order. fp32 rows: one C
    call (cpu_mlp.c's solc_select_channels: comparisons only, the reference's set on any input); else
    topk/sort."""
    m, d = x.shape
    lib = cpu_linear.library() if x.dtype == torch.float32 and x.device.type == "cpu" else None
    if lib is not None:
        xs = x.contiguous()
        counts = torch.tensor([reference.keep_count(k, d) for k in keeps], dtype=torch.int64)
        idx = torch.empty(int(counts.sum()), dtype=torch.int64)
        offsets = torch.empty(m + 1, dtype=torch.int64)
        scratch = torch.empty(d, dtype=torch.int32)
        lib.solc_select_channels(xs.data_ptr(), xs.shape[1], m, d, counts.data_ptr(), idx.data_ptr(),
                                 offsets.data_ptr(), scratch.data_ptr())
        return idx, offsets
    if len(set(keeps)) == 1:
        idx = kept_channels(x, keeps[0]).sort(dim=-1).values
        k = idx.shape[1]
        return idx.reshape(-1), torch.arange(0, (m + 1) * k, k, device=x.device)
    idx = [kept_channels(x[i:i + 1], k)[0].sort().values for i, k in enumerate(keeps)]
    return torch.cat(idx), torch.tensor([0] + [len(j) for j in idx], device=x.device).cumsum(0)


def _bag_rows(offsets: Tensor) -> Tensor:
    """The row of each entry of a flat bag list with these offsets [m + 1]."""
    return torch.repeat_interleave(torch.arange(offsets.numel() - 1, device=offsets.device), offsets.diff())


def _bags(x: Tensor, keeps: list[float], values: Optional[Tensor] = None) -> tuple[Tensor, Tensor, Tensor]:
    """Row-skipping GEMV inputs: (kept channel indices, flat; offsets [m + 1]; weights), one bag per row
    of x [m, d] holding its kept channels (own keep per row) in ascending order, chosen on x (as the
    reference prunes) and weighted by `values` (default x). Ascending order makes a row's sum order a
    function of its kept set alone, whichever selection path found the set."""
    values = x if values is None else values
    flat, offsets = _kept(x, keeps)
    return flat, offsets, values[_bag_rows(offsets), flat]


def _rowskip(x: Tensor, keeps: list[float], wt: Tensor, values: Optional[Tensor] = None) -> Tensor:
    """[m, N] = each row's kept channels of x [m, d] times their rows of wt [d, N], summed in the bag's
    (ascending) order, each row on its own: cpu_mlp.c's solc_rowskip_f32 (fp32), else embedding_bag
    (FBGEMM; also one bag at a time)."""
    lib = cpu_linear.library()
    if lib is None or x.dtype != torch.float32 or wt.dtype != torch.float32 or not wt.is_contiguous():
        flat, offsets, weights = _bags(x, keeps, values)
        return F.embedding_bag(flat, wt, offsets[:-1], mode="sum", per_sample_weights=weights)
    flat, offsets = _kept(x, keeps)
    xs = (x if values is None else values).contiguous()
    y = torch.empty(x.shape[0], wt.shape[1], dtype=torch.float32)
    if lib.solc_rowskip_f32(xs.data_ptr(), xs.shape[1], flat.data_ptr(), offsets.data_ptr(), wt.data_ptr(),
                            y.data_ptr(), x.shape[0], wt.shape[1], wt.shape[0], torch.get_num_threads()):
        raise MemoryError("solc_rowskip_f32: no memory for its scratch")
    return y


def _rowskip_int8(x: Tensor, keeps: list[float], rows: Tensor, scale: Tensor) -> Tensor:
    """[m, N]: the int8 row-skipping GEMV over `rows` (`quant_primitives.int8_rows`: row scale 1 and bias
    -128 hold int8 rows exactly), rows selected on x and weighted by x rounded to bf16; times the output
    channel scale, rounded to bf16 (fp32). cpu_mlp.c's solc_rowskip_int8 (one fmaf chain per output over
    the kept channels in ascending order), else FBGEMM's byte-rowwise embedding_bag."""
    xb = quant_primitives.to_bf16_grid(x, torch.float32).contiguous()
    lib = cpu_linear.library()
    if lib is None:
        flat, offsets, weights = _bags(x, keeps, values=xb)
        y = torch.ops.quantized.embedding_bag_byte_rowwise_offsets(rows, flat, offsets[:-1], False, 0, False,
                                                                   weights, None, False)
        return quant_primitives.to_bf16_grid(y * scale.float(), torch.float32)
    flat, offsets = _kept(x, keeps)
    return _int8_rows_call(lib, xb, flat, offsets, rows, scale)


def _int8_rows_linear(x: Tensor, rows: Tensor, scale: Tensor) -> Tensor:
    """[m, N]: cpu_mlp.c's int8 row kernel over every row of `rows` (the dense pass of `_rowskip_int8`, whose
    bits it gives a pruned input): x rounded to bf16, times the output channel scale, rounded to bf16."""
    return _int8_rows_call(cpu_linear.library(), quant_primitives.to_bf16_grid(x, torch.float32).contiguous(),
                           None, None, rows, scale)


def _int8_rows_call(lib, xb: Tensor, flat: Optional[Tensor], offsets: Optional[Tensor], rows: Tensor,
                    scale: Tensor) -> Tensor:
    sc = scale.float().contiguous()  # held: the C call reads its memory
    N = rows.shape[1] - 8
    y = torch.empty(xb.shape[0], N, dtype=torch.float32)
    if lib.solc_rowskip_int8(xb.data_ptr(), xb.shape[1], None if flat is None else flat.data_ptr(),
                             None if offsets is None else offsets.data_ptr(), rows.data_ptr(), sc.data_ptr(),
                             y.data_ptr(), xb.shape[0], N, rows.shape[0], torch.get_num_threads()):
        raise MemoryError("solc_rowskip_int8: no memory for its scratch")
    return y


def _int8_linear(x: Tensor, q: Tensor, scale: Tensor) -> Tensor:
    """[m, N] = (x rounded to bf16) @ (q [N, K] int8 * scale)^T, rounded to bf16, in fp32."""
    lib = cpu_linear.library()
    if lib is None:
        return torch._weight_int8pack_mm(x.to(torch.bfloat16), q, scale).float()
    xb = quant_primitives.to_bf16_grid(x, torch.float32).contiguous()
    if x.shape[0] == 1 and q.is_contiguous():  # (a copy made here would be packed anew every call)
        cpu_linear.ensure_packed(q)
    q, scale = q.contiguous(), scale.float().contiguous()  # held: the C call reads their memory
    y = torch.empty(x.shape[0], q.shape[0], dtype=torch.float32)
    lib.solc_int8_linear(xb.data_ptr(), xb.shape[1], q.data_ptr(), scale.data_ptr(), y.data_ptr(), x.shape[0],
                         q.shape[0], x.shape[1], torch.get_num_threads())
    return y


def int4_kernel() -> bool:
    """Whether cpu_mlp.c's int4 linear is built here (AVX-512 with BF16); else torch's int4 kernel runs."""
    global _INT4
    if _INT4 is None:
        lib = cpu_linear.library()
        _INT4 = bool(lib is not None and lib.solc_int4_supported())
    return _INT4


_INT4: Optional[bool] = None


def _int4_linear(x: Tensor, c: dict, which: str, group_size: int) -> Tensor:
    """[m, N] = (x rounded to bf16) @ dequant_int4(W)^T, rounded to bf16, in fp32, for the copy `which`
    ("in4" / "out4"): cpu_mlp.c's solc_int4_linear (groups of a multiple of 8), else torch's
    _weight_int4pack_mm_for_cpu on its packed layout of the same copy."""
    packed, sz = c[which], c[which + "_sz"]
    if int4_kernel() and packed is not None and group_size % 8 == 0:
        cpu_linear.ensure_packed(packed, sz, group_size)  # (once) its stream-ordered copy: same bits, read faster
        x = x.float().contiguous()
        y = torch.empty(x.shape[0], packed.shape[0], dtype=torch.float32)
        if not cpu_linear.library().solc_int4_linear(x.data_ptr(), x.shape[1], packed.data_ptr(), sz.data_ptr(),
                                                     group_size, y.data_ptr(), x.shape[0], packed.shape[0], x.shape[1],
                                                     torch.get_num_threads()):
            return y
    return torch._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16), c[which + "_cpu"], group_size, sz).float()


def _add(y: Tensor, bias: Optional[Tensor]) -> Tensor:
    return y if bias is None else y + bias.to(y.dtype)


def _pruned(x: Tensor, keeps: list[float]) -> Tensor:
    """`reference.prune_mlp_input` with each row's own keep, selecting by topk (no full sort)."""
    if all(k >= 1 for k in keeps):
        return x
    flat, offsets = _kept(x, keeps)
    rows = _bag_rows(offsets)
    out = torch.zeros_like(x)
    out[rows, flat] = x[rows, flat]
    return out


def _input_projection(x: Tensor, keeps: list[float], bits: int, row_skip: bool, w_in, b_in, kind, c,
                      group_size) -> Tensor:
    """[m, N_in] pre-activations of rows x [m, d] at one bit level (16 = the model dtype)."""
    bias = reference._input_bias(b_in, w_in, kind)
    if bits >= 16:
        if not row_skip:
            return _dense_input_projection(_pruned(x, keeps), w_in, b_in, kind)
        return _add(_rowskip(x, keeps, c["wt"]), bias)
    if bits == 8 and row_skip:
        return _add(_rowskip_int8(x, keeps, c["in8_rows"], c["in8_scale"]), bias)
    if bits == 8 and c["in8_rows"] is not None and cpu_linear.library() is not None:
        return _add(_int8_rows_linear(_pruned(x, keeps), c["in8_rows"], c["in8_scale"]), bias)
    if bits == 8:
        return _add(_int8_linear(_pruned(x, keeps), c["in8"], c["in8_scale"]), bias)
    return _add(_int4_linear(_pruned(x, keeps), c, "in4", group_size), bias)


def _dense_input_projection(x: Tensor, w_in, b_in, kind) -> Tensor:
    """reference._input_projection of rows x [m, d], each row on its own (cpu_linear)."""
    if kind == "gated":
        return torch.cat([cpu_linear.linear(x, w_in[0], b_in[0]), cpu_linear.linear(x, w_in[1], b_in[1])], dim=-1)
    return cpu_linear.linear(x, w_in[0], b_in[0])


def _dense_mlp(x: Tensor, w_in, b_in, w_out, b_out, kind, fn) -> Tensor:
    """The dense MLP of rows x [m, d] (reference.mlp's dense), each row on its own."""
    return cpu_linear.linear(reference._hidden(_dense_input_projection(x, w_in, b_in, kind), kind, fn), w_out, b_out)


def _down(h: Tensor, bits: int, w_out, b_out, c, group_size) -> Tensor:
    if bits >= 16:
        return cpu_linear.linear(h, w_out, b_out)
    if bits == 8:
        return _add(_int8_linear(h, c["out8"], c["out8_scale"]), b_out)
    return _add(_int4_linear(h, c, "out4", group_size), b_out)


def kernel_of(keep: float, bits: int) -> tuple[int, bool]:
    """(bit level, row-skipping?) of one row with this action alone in its bit level (a batch of one)."""
    return bits, row_skips(bits, [keep])


def row_skips(bits: int, keeps: list[float]) -> bool:
    """Whether the rows of one bit level (their keeps) run the row-skipping GEMV, each reading its kept rows
    of W_in, rather than one dense pass over their pruned inputs. Both give every row the same bits
    (cpu_mlp.c sums a row skip in its dense pass's order), so the choice is by speed alone and may depend
    on the batch. fp32: the pass reads W_in once for all rows, so a dense row needs it anyway, and the row
    skips together must read less than ROW_SKIP_MAX_KEEP of one W_in. int8: the row kernel walks every
    row of the call per chunk of outputs (one read of a chunk's weights whatever the batch), so any pruned
    row makes its group row-skip, a dense row over all its rows. No int4 row skip exists."""
    if bits == 8:
        return any(k < 1 for k in keeps)
    return bits != 4 and all(k < 1 for k in keeps) and sum(keeps) <= ROW_SKIP_MAX_KEEP


def _kernel_groups(actions: list[tuple[float, int]], weight_mode: bool, dtype) -> dict[tuple[int, bool], list[int]]:
    """The rows of a call by (bit level, row skip?): they run together. In activation mode every row
    computes at 16 bits (its bits only pick the output quantizer). With the C kernels on fp32 rows a row
    skip gives the dense pass's bits, so each bit level's rows share one plan chosen by bytes (row_skips);
    otherwise (embedding_bag sums in another order) an action always gets its batch-of-one kernel, so that
    a row's result does not depend on its batch mates."""
    level = [(min(b, 16) if weight_mode else 16) for _, b in actions]
    groups: dict[tuple[int, bool], list[int]] = {}
    if dtype == torch.float32 and cpu_linear.library() is not None:
        by_level: dict[int, list[int]] = {}
        for i, b in enumerate(level):
            by_level.setdefault(b, []).append(i)
        for b, members in by_level.items():
            groups[(b, row_skips(b, [actions[i][0] for i in members]))] = members
        return groups
    for i, ((k, _), b) in enumerate(zip(actions, level)):
        groups.setdefault(kernel_of(k, b), []).append(i)
    return groups


def _needs(bits: int, row_skip: bool) -> tuple[str, ...]:
    if bits == 8:
        return ("in8_scale", "out8", "out8_scale") + (("in8_rows",) if row_skip else ("in8",))
    if bits == 4:
        return ("in4", "in4_sz", "in4_cpu", "out4", "out4_sz", "out4_cpu")  # in4_cpu: torch's kernel for g = 32
    return ("wt",) if row_skip else ()


def applies(x: Tensor, w_in, b_in, w_out, b_out, quant: str) -> bool:
    rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
    tensors = [*w_in, *[b for b in b_in if b is not None], w_out, *([b_out] if b_out is not None else [])]
    return rows >= 1 and x.dtype in DTYPES and all(t.dtype == x.dtype for t in tensors)


def _row_actions(keep: Tensor, bits: Tensor, lead) -> list[tuple[float, int]]:
    hints = step_hints.current()
    m = 1
    for s in lead:
        m *= s
    if hints is not None and hints.mlp is not None and hints.bits is not None:
        return [(float(hints.mlp), int(hints.bits))] * m
    ks = torch.broadcast_to(keep, lead).reshape(-1).tolist()
    bs = torch.broadcast_to(bits, lead).reshape(-1).tolist()
    return [(float(k), int(b)) for k, b in zip(ks, bs)]


def mlp_cpu(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size):
    if not library.cpu_fast_paths():
        return library.mlp._init_fn(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size)
    lead = x.shape[:-1]
    if len(lead) >= 2 and lead[-1] > 1:
        # T > 1 (prefill, teacher forcing): the reference, one batch row at a time, so that a row's
        # result is the same whatever its batch mates (the reference's GEMM over all rows sums in a
        # shape-dependent order). The fast paths are for decode steps.
        return cpu_linear.per_batch_row(
            lambda xr, kr, br: library.mlp._init_fn(xr, kr, br, w_in, b_in, w_out, b_out, kind, act, quant, packs,
                                                    group_size), x, keep, bits)
    if not applies(x, w_in, b_in, w_out, b_out, quant):
        return library.mlp._init_fn(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size)
    rows = x.reshape(-1, x.shape[-1])
    if rows.shape[0] > MAX_ROWS:
        # A decode step over more rows than one call takes: every path below computes a row alone, so
        # calls of MAX_ROWS rows give each row what one call would.
        keep, bits = torch.broadcast_to(keep, lead).reshape(-1, 1), torch.broadcast_to(bits, lead).reshape(-1, 1)
        parts = [_mlp_rows(rows[i:i + MAX_ROWS, None], keep[i:i + MAX_ROWS], bits[i:i + MAX_ROWS], w_in, b_in, w_out,
                           b_out, kind, act, quant, packs, group_size) for i in range(0, rows.shape[0], MAX_ROWS)]
        return torch.cat(parts).reshape(*lead, -1)
    return _mlp_rows(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size)


def _mlp_rows(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size):
    """The fast paths for x [..., d] of at most MAX_ROWS rows."""
    lead, d = x.shape[:-1], x.shape[-1]
    actions = _row_actions(keep, bits, lead)
    fn = reference._activation(act)
    if all(k >= 1 and b >= 16 for k, b in actions):  # dense: no machinery at all
        return _dense_mlp(x.reshape(-1, d), w_in, b_in, w_out, b_out, kind, fn).reshape(*lead, -1)
    c = mlp_weights.unpack(packs)
    weight_mode = quant == "weight"
    groups = _kernel_groups(actions, weight_mode, x.dtype)
    if any(c[name] is None for kern in groups for name in _needs(*kern)):
        return library.mlp._init_fn(x, keep, bits, w_in, b_in, w_out, b_out, kind, act, quant, packs, group_size)
    rows = x.reshape(-1, d)
    out = None
    for (b, row_skip), members in groups.items():
        xs = rows if len(groups) == 1 else rows[members]
        keeps = [actions[i][0] for i in members]
        if b >= 16 and not row_skip and all(k >= 1 for k in keeps):  # the dense MLP
            y = _dense_mlp(xs, w_in, b_in, w_out, b_out, kind, fn)
        else:
            pre = _input_projection(xs.float() if b < 16 else xs, keeps, b, row_skip, w_in, b_in, kind, c, group_size)
            y = _down(reference._hidden(pre, kind, fn), b, w_out, b_out, c, group_size).to(x.dtype)
        if not weight_mode:
            y = reference.fake_quant(y, torch.tensor([float(actions[i][1]) for i in members], device=y.device))
        if len(groups) == 1:
            return y.reshape(*lead, -1).contiguous()
        if out is None:
            out = y.new_empty(rows.shape[0], y.shape[-1])
        out[members] = y
    return out.reshape(*lead, -1)


library.register_cpu(library.mlp, mlp_cpu)
