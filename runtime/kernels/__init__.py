"""Triton kernels that make each action skip work (the CUDA implementations of the solc:: ops).

- `runtime.kernels.mlp`        column-skipping sparse MLP input projection (TEAL), fused gate+up
- `runtime.kernels.quant`      fused per-token fake quantization
- `runtime.kernels.attention`  Quest decode attention (page scoring, top-k pages, split-K attention)
- `runtime.kernels.register`   registers them as the CUDA kernels of solc::mlp / solc::attention

Importing this package imports nothing heavy; the kernel modules import triton when first used.
See docs/kernels.md.
"""
