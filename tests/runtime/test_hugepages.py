"""runtime/hugepages.py: large CPU buffers asked onto transparent huge pages, plain tensors otherwise."""
import pytest
import torch

from runtime import hugepages
from runtime.kv_cache import CacheSpec, StaticKVCache


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and all(c in "0123456789abcdef-" for c in head):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


needs_thp = pytest.mark.skipif(hugepages._madvise() is None, reason="no transparent huge pages to ask for here")


@needs_thp
def test_a_large_buffer_is_aligned_and_advised_for_huge_pages():
    t = hugepages.empty((3, 1 << 20), torch.float32)  # 12 MB
    assert t.shape == (3, 1 << 20) and t.dtype == torch.float32 and t.is_contiguous()
    assert t.data_ptr() % hugepages.HUGE_PAGE == 0
    assert "hg" in _vm_flags(t.data_ptr())  # MADV_HUGEPAGE took
    t.fill_(2.5)
    assert float(t.sum()) == 2.5 * t.numel()


def test_small_buffers_and_the_switch_give_plain_tensors(monkeypatch):
    small = hugepages.empty((7, 9), torch.float64)
    assert small.shape == (7, 9) and small.untyped_storage().nbytes() == 7 * 9 * 8
    monkeypatch.setenv("SOLC_HUGEPAGES", "0")
    hugepages._madvise.cache_clear()
    try:
        big = hugepages.empty((1 << 21,), torch.float32)
        assert big.untyped_storage().nbytes() == 4 << 21  # no 2 MB of slack: torch.empty itself
    finally:
        monkeypatch.undo()
        hugepages._madvise.cache_clear()


@needs_thp
def test_a_long_kv_cache_sits_on_huge_pages_and_holds_its_initial_values():
    cache = StaticKVCache([CacheSpec(3, 64)] * 2, 1, 8192, torch.float32, "cpu")  # 6 MB keys per layer
    k, v, low, high = cache.tensors[:4]
    assert k.data_ptr() % hugepages.HUGE_PAGE == 0 and "hg" in _vm_flags(k.data_ptr())
    assert not k.any() and not v.any()
    assert bool((low == float("inf")).all()) and bool((high == float("-inf")).all())
