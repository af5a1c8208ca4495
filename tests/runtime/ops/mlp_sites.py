"""Random MLP sites with their weight copies, shared by the MLP op tests."""
from __future__ import annotations

import torch

from runtime.ops import mlp_weights

D, F_HIDDEN, GROUP = 64, 96, 32  # 32 divides both in-dims


def make_site(kind: str, dtype=torch.float32, bias: bool = False, seed: int = 0, bits=(4, 8)):
    g = torch.Generator().manual_seed(seed)
    n_in = {"gated": 2, "gated_fused": 1, "plain": 1}[kind]
    rows = 2 * F_HIDDEN if kind == "gated_fused" else F_HIDDEN
    w_in = [(torch.randn(rows, D, generator=g) * 0.2).to(dtype) for _ in range(n_in)]
    b_in = [(torch.randn(rows, generator=g) * 0.1).to(dtype) if bias else None for _ in range(n_in)]
    w_out = (torch.randn(D, F_HIDDEN, generator=g) * 0.2).to(dtype)
    b_out = (torch.randn(D, generator=g) * 0.1).to(dtype) if bias else None
    packs = mlp_weights.make_copies(w_in, w_out, kind, row_skip=True, bits=bits, group_size=GROUP)
    return dict(w_in=w_in, b_in=b_in, w_out=w_out, b_out=b_out, kind=kind, act="silu" if kind != "plain" else "gelu",
                packs=packs, group_size=GROUP)


def call(op, x, keep, bits, site, quant):
    return op(x, keep, bits, site["w_in"], site["b_in"], site["w_out"], site["b_out"], site["kind"], site["act"],
              quant, site["packs"], site["group_size"])
