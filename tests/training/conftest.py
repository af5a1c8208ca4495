import pytest
import torch

import solc


@pytest.fixture(scope="session")
def tiny_sol():
    """A compiled tiny Llama (fp32), shared by the training tests."""
    return solc.compile(solc.load_model("tiny-llama"), max_seq_len=64, quant="activation")


@pytest.fixture(scope="session")
def tiny_sol64():
    """The same in float64: rollouts must match a teacher-forced forward exactly."""
    return solc.compile(solc.load_model("tiny-llama", dtype=torch.float64), max_seq_len=64, quant="activation")
