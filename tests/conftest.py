import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton kernels are tested on CPU through the interpreter; it must be set before triton is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def load_benchmark():
    """load_benchmark("decode") -> the module benchmarks/decode.py (the scripts are not a package)."""
    root = Path(__file__).resolve().parents[1]

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", root / "benchmarks" / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        path = list(sys.path)
        try:
            spec.loader.exec_module(mod)
        finally:  # a script's own sys.path entries must not change what later tests import
            sys.path[:] = path  # (spawned workers get this path: benchmarks/training.py shadowed `training`)
        return mod

    return load
