"""Large CPU buffers on transparent huge pages, where Linux offers them on request.

A decode step at long context reads the KV cache in scattered 2 KB pages (Quest) or in long streams
(dense); on 4 KB pages every few of those reads also misses the TLB. Linux's transparent huge pages in
`madvise` mode (a common default) back a region with 2 MB pages only if the process asks before the
memory is first touched. `empty` asks: it over-allocates by 2 MB, aligns the tensor's start to a 2 MB
boundary and marks the aligned span MADV_HUGEPAGE, then returns the tensor (a view of that buffer).
Where THP is off, the OS is not Linux or the call fails, it is `torch.empty`; nothing depends on it but
speed. SOLC_HUGEPAGES=0 turns it off.

Measured (2026-12-07, AMD EPYC Zen 4, `python benchmarks/hugepages_ab.py --context 16384 --rounds 9`:
`solc_decode_attention` over 30 SmolLM2 layers, random keys, copies of the same caches on 4 KB and on
huge pages by turns in one process), huge / 4 KB pages, 1 thread / 2 threads: keep 1 0.946 / 0.987,
keep 0.6 0.908 / 0.951, keep 0.1 0.965 / 0.989. The same bits.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import math
import os
import sys

import torch
from torch import Tensor

HUGE_PAGE = 2 << 20
MIN_BYTES = 4 << 20  # smaller buffers would gain at most one huge page and waste up to 2 MB of address space
_MADV_HUGEPAGE = 14
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


@functools.lru_cache(maxsize=1)
def _madvise():
    """libc's madvise where THP can be asked for (the setting reads "[always]" or "[madvise]"), else None."""
    if not sys.platform.startswith("linux") or os.environ.get("SOLC_HUGEPAGES", "1") == "0":
        return None
    try:
        with open(_THP_SETTING) as f:
            if "[never]" in f.read():
                return None
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        madvise = libc.madvise
    except (OSError, AttributeError):
        return None
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    madvise.restype = ctypes.c_int
    return madvise


def empty(shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
    """An uninitialised contiguous CPU tensor, its 2 MB-aligned span on huge pages where the OS allows."""
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = _madvise() if nbytes >= MIN_BYTES else None
    if madvise is None:
        return torch.empty(shape, dtype=dtype)
    raw = torch.empty(nbytes + HUGE_PAGE, dtype=torch.uint8)  # not touched yet: no page is mapped
    start = -raw.data_ptr() % HUGE_PAGE
    madvise(raw.data_ptr() + start, nbytes // HUGE_PAGE * HUGE_PAGE, _MADV_HUGEPAGE)  # advice: failure is harmless
    return raw[start:start + nbytes].view(dtype).view(shape)
