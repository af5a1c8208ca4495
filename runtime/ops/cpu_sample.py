"""generate's top-p mask in C (cpu_sample.c): the nucleus without sorting the vocabulary.

    if cpu_sample.top_p_(logits, 0.9):     # fp32 [B, V] on the CPU, changed in place
        ...                                # else the caller runs its torch form
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
    lib = cpu_linear._library
    if lib is None:
        lib = cpu_linear.library()
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
