"""generate's top-p mask: in C (cpu_sample.c, the nucleus without sorting the vocabulary) where it
applies, else the torch form that sorts it.

    cpu_sample.mask_top_p_(logits, 0.9)    # [B, V], changed in place
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

from runtime.ops import cpu_linear, library

_scratch = torch.empty(0, dtype=torch.uint8)  # kept between calls: fresh megabytes each step fault in anew
_lock = threading.Lock()


def top_p_(logits: Tensor, top_p: float) -> bool:
    """Drop (set to -inf), in place, every token of each row of `logits` [B, V] (fp32, contiguous, CPU)
    past the smallest prefix of its descending order whose softmax mass reaches `top_p`. Returns False,
    doing nothing, where the C form does not apply."""
    global _scratch
    lib = cpu_linear._library or cpu_linear.library()
    if (not lib or logits.dtype != torch.float32 or logits.device.type != "cpu" or logits.dim() != 2
            or not logits.is_contiguous() or not library.cpu_fast_paths()):
        return False
    B, V = logits.shape
    need = B * V * lib.solc_sample_entry_size()
    with _lock:
        if _scratch.numel() < need:
            _scratch = torch.empty(need, dtype=torch.uint8)
        lib.solc_top_p_rows(logits.data_ptr(), B, V, float(top_p), _scratch.data_ptr(), torch.get_num_threads())
    return True


def top_p_torch_(logits: Tensor, top_p: float) -> None:
    """The torch form of `top_p_` (any device and dtype), in place: sort the vocabulary, and drop each
    token once the softmax mass before it (fp32 cumsum in the logits' dtype) reaches `top_p`."""
    sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
    probs = torch.softmax(sorted_logits, -1)
    drop = probs.cumsum(-1) - probs >= top_p  # keep the smallest prefix reaching top_p
    logits.masked_fill_(drop.scatter(-1, order, drop), float("-inf"))


def mask_top_p_(logits: Tensor, top_p: float) -> None:
    """`top_p_` where the C form applies, else `top_p_torch_`."""
    if not top_p_(logits, top_p):
        top_p_torch_(logits, top_p)
