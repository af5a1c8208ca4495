"""Kernel tests run the Triton kernels on CPU tensors through the interpreter (TRITON_INTERPRET=1, set by
tests/conftest.py when there is no CUDA). Scratch buffers start as NaN so a read of an unwritten slot shows."""
import pytest


@pytest.fixture(autouse=True)
def poisoned_scratch(monkeypatch):
    pytest.importorskip("triton")
    from runtime.kernels import _common

    monkeypatch.setattr(_common, "POISON_SCRATCH", True)


def nan_like(t):
    import torch

    return torch.full_like(t, float("nan"))
