"""runtime.ops.cpu_linear (the CPU kernel of solc::linear): equal to F.linear up to summation order, and a
row's bits do not depend on its batch mates, the row count, its tile or the thread count's split."""
import ctypes
import os
import platform
import subprocess
import warnings

import pytest
import torch
import torch.nn.functional as F

from runtime.ops import cpu_linear, quant_primitives

# (N, K): a K with a scalar tail (K mod 16 != 0), N not a multiple of the 4-column tile or 32-column block.
SHAPES = [(64, 64), (37, 100), (130, 17), (5, 3)]


@pytest.fixture(autouse=True)
def _cpu_fast_paths_on(monkeypatch):
    monkeypatch.setenv("SOLC_CPU_FAST", "1")


def _data(n, k, rows, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g) * 0.1, torch.randn(n, generator=g)


@pytest.mark.parametrize("n,k", SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_rows_equal_f_linear_up_to_summation_order(n, k, bias):
    x, w, b = _data(n, k, 9)
    b = b if bias else None
    torch.testing.assert_close(cpu_linear.rows_linear(x, w, b), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k", SHAPES)
def test_a_row_has_the_same_bits_alone_and_in_any_batch(threads, n, k):
    x, w, b = _data(n, k, 37, seed=1)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        alone = torch.cat([cpu_linear.rows_linear(x[i:i + 1], w, b) for i in range(x.shape[0])])
        for rows in (2, 3, 4, 5, 16, 37):  # full and partial 4-row tiles
            assert torch.equal(cpu_linear.rows_linear(x[:rows], w, b), alone[:rows]), rows
        # a row's place in the batch does not matter either
        perm = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(2))
        assert torch.equal(cpu_linear.rows_linear(x[perm], w, b), alone[perm])
    finally:
        torch.set_num_threads(old)


def test_prefill_rows_run_one_gemm_per_batch_row():
    """x [B, T, K] with T > 1: row b's result is its own F.linear over its T positions, alone or in a batch."""
    x, w, b = _data(48, 40, 4 * 7, seed=3)
    x = x.reshape(4, 7, 40)
    batch = cpu_linear.linear(x, w, b)
    for i in range(4):
        assert torch.equal(batch[i], F.linear(x[i], w, b))
        assert torch.equal(cpu_linear.linear(x[i:i + 1], w, b)[0], batch[i])


def test_decode_step_shape_runs_the_kernel():
    x, w, b = _data(48, 40, 6, seed=4)
    got = cpu_linear.linear(x[:, None, :], w, b)  # [B, 1, K]: a decode step
    assert got.shape == (6, 1, 48)
    assert torch.equal(got[:, 0], cpu_linear.rows_linear(x, w, b))


def test_other_dtypes_and_layouts_run_f_linear():
    x, w, b = _data(16, 32, 3, seed=5)
    assert not cpu_linear.supports(x.double(), w.double(), b.double())
    assert not cpu_linear.supports(x, w.t().contiguous().t(), b)  # a non-contiguous weight
    assert torch.equal(cpu_linear.linear(x.double(), w.double(), b.double()), F.linear(x.double(), w.double(), b.double()))


def test_op_runs_the_kernel_and_the_reference_when_fast_paths_are_off(monkeypatch):
    x, w, b = _data(24, 32, 5, seed=6)
    x = x[:, None, :]
    assert torch.equal(torch.ops.solc.linear(x, w, b), cpu_linear.linear(x, w, b))
    monkeypatch.setenv("SOLC_CPU_FAST", "0")
    assert torch.equal(torch.ops.solc.linear(x, w, b), F.linear(x, w, b))


def test_without_a_compiler_rows_fall_back_to_one_f_linear_each(monkeypatch, tmp_path):
    """A machine where the kernel cannot be built warns once, names the failure, and stays exact and batch
    invariant (one GEMV per row)."""
    monkeypatch.setenv("SOLC_CACHE", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-compiler"))
    monkeypatch.setattr(cpu_linear, "_library", None)
    x, w, b = _data(24, 32, 5, seed=7)
    with pytest.warns(RuntimeWarning, match="could not build the batch-invariant CPU linear"):
        got = cpu_linear.rows_linear(x, w, b)
    assert torch.equal(got, torch.cat([F.linear(x[i:i + 1], w, b) for i in range(5)]))
    assert not list(tmp_path.glob("kernels/*.so"))  # nothing half-built left behind
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the failure is remembered: no second build, no second warning
        cpu_linear.rows_linear(x, w, b)
    monkeypatch.setattr(cpu_linear, "_library", None)  # the next test loads the real build again


def test_the_build_is_cached_per_source_and_flags(monkeypatch, tmp_path):
    monkeypatch.setenv("SOLC_CACHE", str(tmp_path))
    path = cpu_linear.library_path()
    assert path.parent == tmp_path / "kernels" and path.name.startswith("cpu_linear-")
    monkeypatch.setattr(cpu_linear, "CFLAGS", cpu_linear.CFLAGS + ("-DSOLC_TEST",))
    assert cpu_linear.library_path() != path


def test_another_cpu_gets_another_build(monkeypatch, tmp_path):
    """-march=native code is only safe on the CPU that built it: a shared cache keys builds by CPU flags."""
    monkeypatch.setenv("SOLC_CACHE", str(tmp_path))
    here = cpu_linear.library_path()
    monkeypatch.setattr(cpu_linear, "_cpu_features", lambda: "flags : sse2")
    assert cpu_linear.library_path() != here


def _isa_builds():
    """-march targets this CPU can run, each selecting another code path of the kernels: the generic
    loops without fused multiply-add hardware (x86-64: fmaf in software), AVX2's hand-written loops
    (x86-64-v3), AVX-512 (x86-64-v4)."""
    if platform.machine() != "x86_64":
        return []
    flags = set(cpu_linear._cpu_features().split())
    marches = ["x86-64"]
    if {"avx2", "fma"} <= flags:
        marches.append("x86-64-v3")
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        marches.append("x86-64-v4")
    return marches


def _build_for(march, tmp_path):
    out = tmp_path / f"kernels-{march}.so"
    flags = [f if f != "-march=native" else f"-march={march}" for f in cpu_linear.CFLAGS]
    try:
        subprocess.run([os.environ.get("CC", "cc"), *flags, *map(str, cpu_linear.SOURCES), "-o", str(out)],
                       check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"no C compiler for -march={march}: {e}")
    lib = ctypes.CDLL(str(out))
    for name, argtypes in cpu_linear.SIGNATURES.items():
        getattr(lib, name).argtypes, getattr(lib, name).restype = argtypes, cpu_linear.RESTYPES.get(name)
    return lib


def test_every_instruction_set_path_gives_the_same_bits(tmp_path):
    """The machine a row runs on must not change its result: each -march build of the kernels (generic,
    AVX2, AVX-512 loops) gives the same bits for the fp32 linear (one row, full and edge tiles), the
    int8 linear and the int8 row kernel (kept rows and every row; output counts off the 16-lane grid),
    with K tails."""
    marches = _isa_builds()
    if len(marches) < 2:
        pytest.skip("needs an x86-64 CPU with AVX2 (two code paths to compare)")
    g = torch.Generator().manual_seed(7)
    results = {}
    for march in marches:
        lib = _build_for(march, tmp_path)
        got = []
        for rows, n, k in [(1, 70, 600), (1, 64, 576), (9, 37, 100), (16, 32, 64)]:
            x, w = torch.randn(rows, k, generator=g), torch.randn(n, k, generator=g)
            y = torch.empty(rows, n)
            lib.solc_linear_f32(x.data_ptr(), k, w.data_ptr(), None, y.data_ptr(), rows, n, k, 1)
            q = torch.randint(-127, 128, (n, k), generator=g, dtype=torch.int8)
            scale = torch.rand(n, generator=g) * 0.02
            xb = x.to(torch.bfloat16).float()
            y8 = torch.empty(rows, n)
            lib.solc_int8_linear(xb.data_ptr(), k, q.data_ptr(), scale.data_ptr(), y8.data_ptr(), rows, n, k, 1)
            r8 = quant_primitives.int8_rows(q)
            kept = [torch.randperm(k, generator=g)[: (k * (i + 1)) // (rows + 1)].sort().values for i in range(rows)]
            idx = torch.cat(kept)
            off = torch.tensor([0] + [len(t) for t in kept]).cumsum(0)
            ys, yd = torch.empty(rows, n), torch.empty(rows, n)
            assert lib.solc_rowskip_int8(xb.data_ptr(), k, idx.data_ptr(), off.data_ptr(), r8.data_ptr(),
                                         scale.data_ptr(), ys.data_ptr(), rows, n, k, 1) == 0
            assert lib.solc_rowskip_int8(xb.data_ptr(), k, None, None, r8.data_ptr(), scale.data_ptr(), yd.data_ptr(),
                                         rows, n, k, 1) == 0
            got += [y, y8, ys, yd]
        g.manual_seed(7)  # the next build sees the same inputs
        results[march] = got
    first = results[marches[0]]
    for march in marches[1:]:
        for i, (a, b) in enumerate(zip(first, results[march])):
            assert torch.equal(a, b), f"-march={march} differs from -march={marches[0]} in result {i}"


needs_packing = pytest.mark.skipif(not (cpu_linear.library() and cpu_linear.library().solc_pack_supported()),
                                   reason="the packed GEMV needs an AVX-512 build")


@needs_packing
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("n,k", [(130, 100), (48, 576), (37, 17), (16, 16)])
def test_a_packed_copy_gives_the_same_bits_as_the_weight_read_in_place(monkeypatch, threads, n, k):
    """The one-row GEMV over the packed copy (full 16-row groups and 16-column steps; the tails read w)
    runs each output's fmaf sequence unchanged. Checked against the in-place GEMV and a batch's tiles."""
    x, w, b = _data(n, k, 5, seed=4)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        monkeypatch.setenv("SOLC_CPU_PACK", "0")
        in_place = [cpu_linear.rows_linear(x[i:i + 1], w, b) for i in range(5)]
        assert (w.data_ptr(), n, k) not in cpu_linear._packed
        held = cpu_linear.packed_bytes()
        monkeypatch.setenv("SOLC_CPU_PACK", "1")
        packed = [cpu_linear.rows_linear(x[i:i + 1], w, b) for i in range(5)]
        assert cpu_linear.packed_bytes() - held == (n - n % 16) * (k - k % 16) * 4
        for a, p in zip(in_place, packed):
            assert torch.equal(a, p)
        assert torch.equal(torch.cat(packed), cpu_linear.rows_linear(x, w, b))  # 4-row tiles over w
    finally:
        torch.set_num_threads(old)


@needs_packing
def test_packed_copies_stop_at_half_the_memory_available_to_them(monkeypatch):
    """Each copy may take a quarter of the memory available now, all of them together half of what was
    available to them (available now + held): with 200 KB available, 24 KB copies (each taking its bytes
    from what is available) are made until the fifth, which a quarter would still allow but which would
    take the copies past 100 KB; then weights are read in place."""
    monkeypatch.setenv("SOLC_CPU_PACK", "1")
    size, others = 96 * 64 * 4, cpu_linear.packed_bytes()  # copies of other tests' weights may be alive
    monkeypatch.setattr(cpu_linear, "packed_bytes", lambda real=cpu_linear.packed_bytes: real() - others)
    state = {"free": 200_000}
    monkeypatch.setattr(cpu_linear, "_memory_available", lambda: state["free"])
    weights, made = [torch.randn(96, 64) for _ in range(6)], []
    for w in weights:
        before = cpu_linear.packed_bytes()
        cpu_linear.ensure_packed(w)
        made.append(cpu_linear.packed_bytes() - before)
        state["free"] -= made[-1]
    # the fifth: 4 x 24576 <= 101696 (a quarter fits), but 2 x (98304 + 24576) > 101696 + 98304
    assert made == [size] * 4 + [0, 0]
    state["free"] = 10**12
    cpu_linear.ensure_packed(weights[4])
    assert cpu_linear.packed_bytes() == 5 * size
    state["free"] = 4 * size  # a quarter exactly: this copy alone would fit, the five held make it too much
    cpu_linear.ensure_packed(weights[5])
    assert cpu_linear.packed_bytes() == 5 * size


@needs_packing
def test_a_packed_copy_follows_its_weight(monkeypatch):
    """Changed in place, the weight is packed again; freed, its copy is forgotten (C table and memory)."""
    monkeypatch.setenv("SOLC_CPU_PACK", "1")
    x, w, _ = _data(64, 48, 1, seed=5)
    reference = F.linear(x, w)
    torch.testing.assert_close(cpu_linear.rows_linear(x, w, None), reference, rtol=1e-5, atol=1e-5)
    key = (w.data_ptr(), 64, 48)
    assert key in cpu_linear._packed
    w.mul_(-2)
    torch.testing.assert_close(cpu_linear.rows_linear(x, w, None), -2 * reference, rtol=1e-5, atol=1e-5)
    lib = cpu_linear.library()
    assert lib.solc_packed_of(*key) == cpu_linear._packed[key][1].data_ptr()
    with cpu_linear.packed_copies_off():  # the C table forgets the copy for the block, Python keeps it
        assert lib.solc_packed_of(*key) is None and key in cpu_linear._packed
        torch.testing.assert_close(cpu_linear.rows_linear(x, w, None), -2 * reference, rtol=1e-5, atol=1e-5)
    assert lib.solc_packed_of(*key) == cpu_linear._packed[key][1].data_ptr()
    held = cpu_linear.packed_bytes()
    del w
    assert key not in cpu_linear._packed and lib.solc_packed_of(*key) is None
    assert held - cpu_linear.packed_bytes() == 64 * 48 * 4
    # a new weight at the same address, if the allocator gives one, is not read through the old copy
    w2 = torch.randn(64, 48)
    monkeypatch.setenv("SOLC_CPU_PACK", "0")
    torch.testing.assert_close(cpu_linear.rows_linear(x, w2, None), F.linear(x, w2), rtol=1e-5, atol=1e-5)
