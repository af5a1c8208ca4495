"""Kernel tests run the Triton kernels on CPU tensors through the interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py when there is no CUDA). Scratch buffers start as NaN so a read of an unwritten slot shows.
On a machine with CUDA (and no TRITON_INTERPRET=1) those tests skip: test_cuda_kernels.py runs the
compiled kernels on the device instead."""
import os
from pathlib import Path

import pytest
import torch

_HERE = Path(__file__).resolve().parent
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") == "1"


def pytest_collection_modifyitems(config, items):
    if _INTERPRETED or not torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="a Triton interpreter test on CPU tensors (CUDA is present and TRITON_INTERPRET "
                                   "is not 1): test_cuda_kernels.py runs the kernels on the device")
    for item in items:
        path = Path(str(item.fspath)).resolve()
        if path.parent == _HERE and path.name != "test_cuda_kernels.py":
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    pytest.importorskip("triton")
    from runtime.kernels import _common

    monkeypatch.setattr(_common, "POISON_SCRATCH", True)


def nan_like(t):
    import torch

    return torch.full_like(t, float("nan"))
