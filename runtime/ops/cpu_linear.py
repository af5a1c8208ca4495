"""The CPU implementation of `solc::linear`: a linear layer whose rows do not depend on their batch mates.

Why: MKL runs a one-row linear as a GEMV and several rows as a GEMM, and the two sum in different orders.
The last-bit difference is harmless by itself, but the discrete choices downstream (MLP channel top-k,
page top-k, quantizer roundings) amplify it: a row's log-probs moved by up to 5 nats/token between
batch 1 and batch 4 (DESIGN invariant 6). So every row's result here is a function of that row alone:
  T == 1 (a decode step, any batch)   `cpu_linear.c`: each output summed in one fixed order (16 lane fma sums,
                                      a scalar tail, a fixed tree) whatever the row count, tile or thread
                                      split; fp32 only. Built once per machine with the C compiler into
                                      the solc cache; without a compiler, one F.linear per row (also exact,
                                      B times the weight reads).
  T > 1 (prefill, teacher forcing)    one F.linear per batch row over its T positions: a row's call is
                                      the same alone or in a batch, and stays a GEMM.
Other dtypes (bf16, fp64) run F.linear on the whole batch: batch invariance is claimed for fp32 only.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import subprocess
import sysconfig
import threading
import warnings
import weakref
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

# One library of the CPU kernels: this module's linear, solc::mlp's (runtime/ops/cpu_mlp.py) and
# solc::attention's decode kernel (runtime/ops/cpu_attention.py) and the eager program's fused rotary
# embedding (runtime/ops/cpu_rotary.py) and attention block (runtime/ops/cpu_block.py), and the policy
# network's decision step (runtime/ops/cpu_policy.py), and generate's top-p mask (runtime/ops/cpu_sample.py).
SOURCES = tuple(Path(__file__).with_name(name)
                for name in ("cpu_linear.c", "cpu_mlp.c", "cpu_attention.c", "cpu_rotary.c", "cpu_block.c",
                             "cpu_policy.c", "cpu_sample.c"))
HEADERS = tuple(Path(__file__).with_name(name) for name in ("cpu_fixed_order.h", "cpu_select.h", "cpu_bf16.h"))  # part of the build's key
# -ffp-contract=off: no path may fuse a multiply-add that another path does not (see the sources).
CFLAGS = ("-O3", "-march=native", "-ffp-contract=off", "-fopenmp", "-fPIC", "-shared")
_lock = threading.Lock()
_library = None  # the loaded ctypes library, False once building failed

_F32 = torch.float32
_P, _L, _I = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
SIGNATURES = {  # C function -> argument types (return types: RESTYPES)
    "solc_linear_f32": [_P, _L, _P, _P, _P, _L, _L, _L, _I],
    "solc_int8_linear": [_P, _L, _P, _P, _P, _L, _L, _L, _I],
    "solc_decode_attention": [_P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L, _L, ctypes.c_float, _P, _P, _L, _I],
    "solc_decode_attention_scratch": [_L, _L, _L, _L],
    "solc_write_kv": [_P, _P, _P, _P, _P, _P, _P, _L, _L, _L, _L, _L],
    "solc_rowskip_f32": [_P, _L, _P, _P, _P, _P, _L, _L, _L, _I],
    "solc_rowskip_int8": [_P, _L, _P, _P, _P, _P, _P, _L, _L, _L, _I],
    "solc_select_channels": [_P, _L, _L, _L, _P, _P, _P, _P],
    "solc_rotary_f32": [_P, _L, _L, _P, _P, _L, _P, _L, _L, _L, _L, _L],
    "solc_attention_block": [_P, _P, ctypes.c_float, _P, _L, _L, _P, _P, _P, _P, _P, _P, _P, _P, _L, _P, _P, _P, _P,
                             _P, _P, _L, _L, _L, _L, _L, ctypes.c_float, _P, _P, _P, _P, _P, _L, _I],
    "solc_mlp_input": [_P, _P, ctypes.c_float, _P, _L, _L, _I, _L, _P, _P, _L, _P, _P, _P, _P, _P, _P, _L, _P, _P, _P,
                       _P, _I],
    "solc_mlp_output": [_P, _L, _L, _I, _P, _P, _P, _P, _P, _L, _P, _L, _P, _P, _I],
    "solc_int4_linear": [_P, _L, _P, _P, _L, _P, _L, _L, _L, _I],
    "solc_int4_supported": [],
    "solc_set_expf16": [_P],
    "solc_mean_of_squares": [_P, _L, _L, _P, _P],
    "solc_silu_mul": [_P, _L, _L, _P],
    "solc_mlp_block": [_P, _P, ctypes.c_float, _P, _L, _L, _I, _L, _P, _P, _L, _P, _P, _P, _P, _P, _P, _L, _P, _P, _P, _P,
                       _P, _P, _P, _P, _P, _P, _P, _I],
    "solc_chain_block_size": [],
    "solc_block_chain": [_P, _L, _P, _P, _P, _P, _P, _L, _P, _P, _P, _P, _I],
    "solc_pack_supported": [],
    "solc_pack_f32": [_P, _L, _L, _P],
    "solc_pack_i8": [_P, _L, _L, _P],
    "solc_pack_i4": [_P, _P, _L, _L, _L, _P],
    "solc_pack_register": [_P, _L, _L, _P],
    "solc_packed_of": [_P, _L, _L],
    "solc_policy_scratch": [_L, _L, _L, _L, _L, _L],
    "solc_policy_step": [_P, _P, _P, _P, _P, _L, _P, _P, _I],
    "solc_top_p_rows": [_P, _L, _L, ctypes.c_double, _P, _I],
    "solc_sample_entry_size": [],
    "solc_policy_decide": [_P, _P, _L, _L, _L, _P, _P, _P, _P, _P, _P, _P, ctypes.c_float, _L, _P, _P, _P, _P, _I],
}
RESTYPES = {"solc_int4_linear": ctypes.c_int, "solc_rowskip_int8": ctypes.c_int, "solc_rowskip_f32": ctypes.c_int,
            "solc_int4_supported": ctypes.c_int, "solc_mlp_input": ctypes.c_int,
            "solc_mlp_output": ctypes.c_int, "solc_mlp_block": ctypes.c_int, "solc_chain_block_size": ctypes.c_long,
            "solc_decode_attention_scratch": ctypes.c_long,
            "solc_block_chain": ctypes.c_int, "solc_pack_supported": ctypes.c_int,
            "solc_pack_register": ctypes.c_int, "solc_packed_of": ctypes.c_void_p,
            "solc_policy_scratch": ctypes.c_long, "solc_sample_entry_size": ctypes.c_long}  # the others return void


def _cpu_features() -> str:
    """The CPU's instruction-set flags: -march=native code from one machine may not run on another (a
    cache directory shared over NFS), so they are part of the build's key."""
    try:
        with open("/proc/cpuinfo") as f:
            return next((line for line in f if line.startswith("flags")), "")
    except OSError:
        return platform.processor()


def library_path() -> Path:
    """Where this machine's build lives: keyed by the sources, the flags, the target and the CPU features."""
    from runtime.files import cache_root

    key = hashlib.sha256(b"".join(src.read_bytes() for src in SOURCES + HEADERS) + " ".join(CFLAGS).encode()
                         + (sysconfig.get_platform() + os.uname().machine + _cpu_features()).encode()).hexdigest()[:16]
    return cache_root() / "kernels" / f"cpu_linear-{key}.so"


def _build(target: Path) -> None:
    from runtime.files import temp_sibling

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_sibling(target)
    compiler = os.environ.get("CC", "cc")
    try:
        subprocess.run([compiler, *CFLAGS, *map(str, SOURCES), "-o", str(tmp)], check=True, capture_output=True,
                       text=True)
        os.replace(tmp, target)  # atomic: a concurrent process loads either nothing or a whole library
    finally:
        tmp.unlink(missing_ok=True)


def library():
    """The kernels' ctypes library (built on first use), or None where it cannot be built (a warning
    says why; callers then run their exact fallbacks)."""
    global _library
    if _library is None:
        with _lock:
            if _library is None:
                try:
                    path = library_path()
                    if not path.exists():
                        _build(path)
                    lib = ctypes.CDLL(str(path))
                    for name, argtypes in SIGNATURES.items():
                        fn = getattr(lib, name)
                        fn.argtypes, fn.restype = argtypes, RESTYPES.get(name)
                    _library = lib
                except (OSError, subprocess.CalledProcessError) as e:
                    detail = e.stderr.strip()[-300:] if isinstance(e, subprocess.CalledProcessError) else str(e)
                    warnings.warn(f"solc: could not build the batch-invariant CPU linear ({detail}); decode steps "
                                  "run one F.linear per row instead (exact, slower at batch > 1)", RuntimeWarning)
                    _library = False
    return _library or None


# -- packed copies for the one-row GEMV (cpu_linear.c: the layout and why) ------------------------------
# (address, N, K) -> (weight version at packing, the copy). A copy lives as long as its weight's storage
# (a finalizer on the storage forgets it), so an address is never reused while the C table holds it.
_packed: dict[tuple[int, int, int], tuple[int, Tensor]] = {}
_pack_lock = threading.Lock()


def packing_enabled() -> bool:
    """SOLC_CPU_PACK=0 turns the packed copies off. They cost a second copy of every fp32 weight (and
    int8 down_proj copy) that a batch-1 decode step reads, and of every int4 copy with its scales: +609 MB
    for SmolLM2-135M in fp32 once every bit level has run. A copy is also skipped when it would take more
    than a quarter of the memory still available."""
    return os.environ.get("SOLC_CPU_PACK", "1") != "0"


def _memory_available() -> Optional[int]:
    """MemAvailable from /proc/meminfo in bytes (None where there is none)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _copy_fits(size: int) -> bool:
    """Whether one more packed copy of `size` bytes may be made: it takes at most a quarter of the memory
    available now, and all copies together at most half of what was available to them (available now plus
    what they hold), so a large model's copies cannot take the machine's memory one small copy at a time."""
    available = _memory_available()
    if available is None:
        return True
    held = packed_bytes()
    return 4 * size <= available and 2 * (held + size) <= available + held


def _version(w: Tensor) -> int:
    try:
        return w._version
    except RuntimeError:  # an inference tensor: it cannot change in place
        return -1


_PACKERS = {torch.float32: "solc_pack_f32", torch.int8: "solc_pack_i8"}  # dtype -> its C packer (16 x 16 blocks)


def _int4_packed_bytes(q: Tensor, scales: Optional[Tensor], group_size: int) -> int:
    """Bytes of solc_pack_i4's copy of the int4 copy q [N, K / 2] with its scales [K / g, N, 2] (per full
    16-row block: its K / 8 slices and K / g scale lines of 64 bytes), 0 where the pair does not fit it."""
    N, KB = q.shape
    K = 2 * KB
    if (scales is None or group_size <= 0 or group_size % 8 or K % group_size or scales.dtype != torch.bfloat16
            or not scales.is_contiguous() or tuple(scales.shape) != (K // group_size, N, 2)):
        return 0
    return (N // 16) * (K // 8 + K // group_size) * 64


def ensure_packed(w: Tensor, scales: Optional[Tensor] = None, group_size: int = 0) -> None:
    """Gives the weight w [N, K] a packed copy (once; again after it changed in place, as far as the version
    counters tell): fp32 or an int8 copy for the GEMVs (cpu_linear.c, cpu_mlp.c's int8 linear), or an int4
    copy (uint8 [N, K / 2] nibbles) with its `scales` and `group_size` for cpu_mlp.c's int4 linear, which
    then reads one stream per 16 rows instead of building it per call. Same results, read faster."""
    int4 = w.dtype == torch.uint8
    key = (w.data_ptr(), w.shape[0], w.shape[1]) if w.dim() == 2 else None
    version = (_version(w), _version(scales)) if int4 and scales is not None else _version(w)
    held = _packed.get(key)
    if held is not None and held[0] == version:
        return
    lib = _library or library()
    if (lib is None or key is None or not (int4 or w.dtype in _PACKERS) or w.device.type != "cpu"
            or not w.is_contiguous() or min(w.shape) < 16 or not packing_enabled() or not lib.solc_pack_supported()
            or (int4 and not lib.solc_int4_supported())):
        return
    N, K = w.shape
    size = _int4_packed_bytes(w, scales, group_size) if int4 else (N - N % 16) * (K - K % 16) * w.element_size()
    if not size or not _copy_fits(size):
        return  # a speed-up is not worth the machine's last memory: read in place
    with _pack_lock:
        fresh = key not in _packed
        copy = torch.empty(size // w.element_size(), dtype=w.dtype)
        if int4:
            lib.solc_pack_i4(w.data_ptr(), scales.data_ptr(), group_size, N, K, copy.data_ptr())
        else:
            getattr(lib, _PACKERS[w.dtype])(w.data_ptr(), N, K, copy.data_ptr())
        if not lib.solc_pack_register(w.data_ptr(), N, K, copy.data_ptr()):
            return  # the table is full: this weight's GEMVs read it in place
        _packed[key] = (version, copy)
        if fresh:
            weakref.finalize(w.untyped_storage(), _forget, key)


def _forget(key: tuple[int, int, int]) -> None:
    with _pack_lock:
        if _packed.pop(key, None) is not None and _library:
            _library.solc_pack_register(key[0], key[1], key[2], None)


@contextlib.contextmanager
def packed_copies_off():
    """Within the block the GEMVs read every weight in place (the copies stay, unregistered from the C
    table): for side-by-side measurements (benchmarks/decode.py's "solc dense, in place" row)."""
    lib = _library
    with _pack_lock:
        held = list(_packed)
        for key in held:
            lib.solc_pack_register(*key, None)
    try:
        yield
    finally:
        with _pack_lock:
            for key in held:
                if key in _packed:
                    lib.solc_pack_register(*key, _packed[key][1].data_ptr())


def packed_bytes() -> int:
    """The memory the packed copies hold now."""
    return sum(copy.numel() * copy.element_size() for _, copy in list(_packed.values()))


def rows_linear(x: Tensor, w: Tensor, b: Optional[Tensor]) -> Tensor:
    """x [M, K] @ w[N, K]^T (+ b) with each row summed in the kernel's fixed order (fp32, contiguous w)."""
    lib = _library or library()
    if lib is None:
        return torch.cat([F.linear(x[i:i + 1], w, b) for i in range(x.shape[0])])
    x = x.contiguous()
    (M, K), N = x.shape, w.shape[0]
    if M == 1:
        ensure_packed(w)
    y = torch.empty(M, N, dtype=_F32)
    lib.solc_linear_f32(x.data_ptr(), K, w.data_ptr(), b.data_ptr() if b is not None else None, y.data_ptr(),
                        M, N, K, torch.get_num_threads())
    return y


def supports(x: Tensor, w: Tensor, b: Optional[Tensor]) -> bool:
    return (x.device.type == "cpu" and x.dtype == torch.float32 and w.dtype == torch.float32 and w.is_contiguous()
            and (b is None or (b.dtype == torch.float32 and b.is_contiguous())) and x.shape[-1] == w.shape[1])


def per_batch_row(fn, x: Tensor, *aligned: Tensor) -> Tensor:
    """fn over each batch row of x [..., T, d] on its own, as fn(x_row [1, T, d], *aligned_rows [1, T]),
    concatenated: a row's call is the same alone or in a batch. `aligned` broadcast to x.shape[:-1]."""
    lead, T = x.shape[:-2], x.shape[-2]
    xs = x.reshape(-1, T, x.shape[-1])
    if xs.shape[0] == 1:
        return fn(x, *aligned)
    parts = [torch.broadcast_to(a, x.shape[:-1]).reshape(-1, T) for a in aligned]
    out = torch.cat([fn(xs[i:i + 1], *(a[i:i + 1] for a in parts)) for i in range(xs.shape[0])])
    return out.reshape(*lead, T, -1)


def linear(x: Tensor, w: Tensor, b: Optional[Tensor] = None) -> Tensor:
    """F.linear(x, w, b), each batch row computed on its own (see the module doc). x [..., T, K]: the
    leading dims are batch rows, T their positions; x [M, K]: M independent rows (a decode step's)."""
    shape = x.shape
    if (len(shape) == 3 and shape[1] == 1 and shape[0] and x.dtype is _F32 and w.dtype is _F32
            and x.device.type == "cpu" and w.is_contiguous() and w.shape[1] == shape[2]
            and (b is None or (b.dtype is _F32 and b.is_contiguous()))):
        # A decode step's linear [B, 1, K] (~200 calls a SmolLM2 step): supports()'s checks in their
        # cheapest order, and no detour through the general shapes.
        return rows_linear(x.view(shape[0], shape[2]) if x.is_contiguous() else x.reshape(shape[0], shape[2]),
                           w, b).view(shape[0], 1, w.shape[0])
    if not supports(x, w, b) or x.numel() == 0:
        return F.linear(x, w, b)
    if x.dim() >= 3 and x.shape[-2] > 1:  # T > 1: one GEMM per batch row
        return per_batch_row(lambda r: F.linear(r, w, b), x)
    return rows_linear(x.reshape(-1, x.shape[-1]), w, b).reshape(*x.shape[:-1], w.shape[0])


def linear_cpu(x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    from runtime.ops import library

    if not library.cpu_fast_paths():
        return F.linear(x, weight, bias)
    return linear(x, weight, bias)


def _register() -> None:
    from runtime.ops import library

    library.register_cpu(library.linear, linear_cpu)


_register()
