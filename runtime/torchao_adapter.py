"""Every torchao call of solc lives here (as every transformers call lives in hf_adapter).

solc's weight-quant copies (quant="weight") are made with torchao's quantization primitives, so their
formats and rounding are torchao's:
  int8: `choose_qparams_affine` + `quantize_affine`, symmetric, one scale per output channel (block
        [1, K]), int8 range [-128, 127], as `Int8WeightOnlyConfig` does; the scale is then rounded to
        bfloat16 (what the CPU int8 kernel reads) BEFORE quantizing, passed as float32 so that torchao
        divides by it in float32 (a bf16 scale would make torchao take a bf16 reciprocal).
  int4: torchao's tinygemm path (`_choose_qparams_affine_tinygemm` + `_quantize_affine_tinygemm`, what
        `Int4WeightOnlyConfig` uses for its tinygemm formats): asymmetric, groups of `group_size` input
        channels, values 0..15, float-domain zero point; scales and zeros bfloat16, packed by
        `pack_tinygemm_scales_and_zeros` into [K // g, N, 2].
The storage formats are described in `runtime.ops.quant_primitives`, which reads them without torchao.
torchao is imported on first use (its import is slow and chatty).
"""
from __future__ import annotations

import torch
from torch import Tensor, nn

from runtime.ops.quant_primitives import pack_nibbles


def _ao():
    import torchao.quantization.quant_primitives as qp
    import torchao.quantization.utils as qu

    return qp, qu


@torch.no_grad()
def quantize_int8(weight: Tensor) -> tuple[Tensor, Tensor]:
    """(q int8 [N, K], scale bf16 [N]) of weight [N, K]: symmetric per output channel."""
    qp, _ = _ao()
    w = weight.detach().float()
    block = (1, w.shape[1])
    scale, zero = qp.choose_qparams_affine(
        w, qp.MappingType.SYMMETRIC, block, torch.int8, quant_min=-128, quant_max=127,
        eps=torch.finfo(torch.float32).eps, scale_dtype=torch.float32, zero_point_dtype=torch.int8,
    )
    scale = scale.to(torch.bfloat16)
    q = qp.quantize_affine(w, block, scale.float(), zero, torch.int8, quant_min=-128, quant_max=127)
    return q.reshape(w.shape).contiguous(), scale.reshape(-1).contiguous()


@torch.no_grad()
def quantize_int4(weight: Tensor, group_size: int) -> tuple[Tensor, Tensor]:
    """(q uint8 [N, K // 2] nibble-packed, scales_and_zeros bf16 [K // g, N, 2]) of weight [N, K]:
    asymmetric, groupwise along the input dim, torchao's tinygemm convention."""
    qp, qu = _ao()
    w = weight.detach().float()
    N, K = w.shape
    if K % group_size:
        raise ValueError(f"int4 group size {group_size} does not divide the in-dim {K}")
    block = (1, group_size)
    scale, zero = qp._choose_qparams_affine_tinygemm(
        w, qp.MappingType.ASYMMETRIC, block, torch.int32, quant_min=0, quant_max=15,
        scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16,
    )
    q = qp._quantize_affine_tinygemm(w, list(block), scale, zero, torch.int32, quant_min=0, quant_max=15)
    scales_and_zeros = qu.pack_tinygemm_scales_and_zeros(
        scale.reshape(N, -1), zero.reshape(N, -1), torch.bfloat16
    )
    return pack_nibbles(q.reshape(N, K)).contiguous(), scales_and_zeros.contiguous()


@torch.no_grad()
def dequantize_int4_reference(weight: Tensor, group_size: int) -> Tensor:
    """torchao's own int4 quantize -> dequantize round trip of weight [N, K] (float32), for external checks."""
    qp, _ = _ao()
    w = weight.detach().float()
    block = (1, group_size)
    scale, zero = qp._choose_qparams_affine_tinygemm(
        w, qp.MappingType.ASYMMETRIC, block, torch.int32, quant_min=0, quant_max=15,
        scale_dtype=torch.bfloat16, zero_point_dtype=torch.bfloat16,
    )
    q = qp._quantize_affine_tinygemm(w, list(block), scale, zero, torch.int32, quant_min=0, quant_max=15)
    return qp._dequantize_affine_tinygemm(q, list(block), scale, zero, torch.int32, 0, 15,
                                          output_dtype=torch.float32)


def int8_weight_only_(model: nn.Module, module_names) -> None:
    """torchao's own int8 weight-only quantization (`quantize_` with `Int8WeightOnlyConfig`) applied, in
    place, to the linear modules named in `module_names` (for external checks)."""
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    names = set(module_names)
    quantize_(model, Int8WeightOnlyConfig(set_inductor_config=False), filter_fn=lambda m, fqn: fqn in names)
