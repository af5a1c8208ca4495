"""The per-site weight copies an MLP site's fast paths and weight-quant levels read, made ONCE (at compile
time) and handed to `solc::mlp` as one list in the fixed order of `PACK_FIELDS` (absent copies are None):

  wt          [K, N_in]  W_in^T in the model dtype: one input channel's gate/up weights are one contiguous
                         row, so `F.embedding_bag` over its rows is a row-skipping GEMV (mlp axis enabled)
  in8, in8_scale         int8 [N_in, K] + bf16 [N_in]: W_in at 8 bits (gate and up rows concatenated)
  in8_rows    [K, N_in+8] the byte-rowwise form of in8^T (8 bits and the mlp axis enabled)
  out8, out8_scale       int8 [d_out, F] + bf16 [d_out]: W_out at 8 bits
  in4, in4_sz            nibble-packed uint8 [N_in, K/2] + bf16 [K/g, N_in, 2]: W_in at 4 bits
  in4_cpu                in4 packed for `torch._weight_int4pack_mm_for_cpu` (CPU models only)
  out4, out4_sz, out4_cpu  the same for W_out

N_in = 2F for gated sites (gate rows first, then up), the fused gate_up rows for gated_fused, F for plain.
Formats: `runtime.ops.quant_primitives`; quantization: `runtime.torchao_adapter`.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from runtime.ops import quant_primitives as qp

PACK_FIELDS: tuple[str, ...] = (
    "wt", "in8", "in8_scale", "in8_rows", "out8", "out8_scale",
    "in4", "in4_sz", "in4_cpu", "out4", "out4_sz", "out4_cpu",
)


def unpack(packs: Optional[list]) -> dict[str, Optional[Tensor]]:
    packs = list(packs or [])
    if packs and len(packs) != len(PACK_FIELDS):
        raise ValueError(f"solc::mlp packs: expected {len(PACK_FIELDS)} entries {list(PACK_FIELDS)}, got {len(packs)}")
    return dict(zip(PACK_FIELDS, packs)) if packs else dict.fromkeys(PACK_FIELDS)


def input_matrix(w_in: list[Tensor], kind: str) -> Tensor:
    """W_in [N_in, K]: gate and up stacked for "gated", else the single input weight."""
    return torch.cat([w.detach() for w in w_in], dim=0) if kind == "gated" else w_in[0].detach()


def pack_int4_for_cpu(packed: Tensor) -> Tensor:
    """`quant_primitives`' nibble format -> the layout `torch._weight_int4pack_mm_for_cpu` reads."""
    q = qp.unpack_nibbles(packed).to(torch.int32)
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.contiguous(), 1)


@torch.no_grad()
def make_copies(w_in: list[Tensor], w_out: Tensor, kind: str, *, row_skip: bool, bits: tuple[int, ...],
                group_size: int) -> list[Optional[Tensor]]:
    """The copies one site needs: `row_skip` (the mlp axis is enabled) and the weight-quant `bits` (< 16)."""
    from runtime import torchao_adapter  # only weight-quant spaces need torchao

    w = input_matrix(w_in, kind)
    on_cpu = w.device.type == "cpu"
    c: dict[str, Optional[Tensor]] = dict.fromkeys(PACK_FIELDS)
    if row_skip:
        c["wt"] = w.t().contiguous()
    if 8 in bits:
        c["in8"], c["in8_scale"] = torchao_adapter.quantize_int8(w)
        c["out8"], c["out8_scale"] = torchao_adapter.quantize_int8(w_out)
        if row_skip:
            c["in8_rows"] = qp.int8_rows(c["in8"])
    if 4 in bits:
        c["in4"], c["in4_sz"] = torchao_adapter.quantize_int4(w, group_size)
        c["out4"], c["out4_sz"] = torchao_adapter.quantize_int4(w_out, group_size)
        if on_cpu:
            c["in4_cpu"] = pack_int4_for_cpu(c["in4"])
            c["out4_cpu"] = pack_int4_for_cpu(c["out4"])
    return [c[f] for f in PACK_FIELDS]


def copies_bytes(packs: list[Optional[Tensor]]) -> int:
    return sum(t.numel() * t.element_size() for t in packs if t is not None)
