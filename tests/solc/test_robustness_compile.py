"""compile(max_seq_len=...): every value is checked before capture; the sliding-window advice works."""
import pytest
import torch

import solc
from runtime import hf_adapter
from runtime.errors import ArgumentError, UnsupportedModelError
from solc.models import TINY_MODELS


@pytest.mark.parametrize("value, kind", [(0, ArgumentError), (-3, ArgumentError), (10, ArgumentError), (1025, ArgumentError),
                                         (2.5, TypeError), ("64", TypeError), (True, TypeError)])
def test_bad_max_seq_len_is_named_before_capture(value, kind):
    with pytest.raises(kind, match=r"max_seq_len=.*an int in 16\.\.1024.*the model's 1024 positions"):
        solc.compile(solc.load_model("tiny-llama"), max_seq_len=value)


def _mistral(window):
    return hf_adapter.model_from_config(dict(TINY_MODELS["tiny-mistral"], sliding_window=window), seed=0)


def test_sliding_window_advice_leads_to_a_working_compile():
    model = _mistral(20)
    with pytest.raises(UnsupportedModelError, match=r"pass max_seq_len in 16\.\.20") as err:
        solc.compile(model)
    assert "sliding attention window of 20" in str(err.value)
    sol = solc.compile(model, max_seq_len=20)  # the advice, followed
    ids = torch.randint(0, 256, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(sol(ids).logits, model(ids).logits, atol=1e-4, rtol=0)


def test_window_shorter_than_the_smallest_context_is_unsupported():
    with pytest.raises(UnsupportedModelError, match=r"window of 8 tokens, shorter than the smallest max_seq_len solc compiles \(16\)"):
        solc.compile(_mistral(8))


def test_extended_positions_let_a_speed_benchmark_compile_past_the_trained_length():
    """benchmarks/decode.py --pretrained at 16k contexts: the model's bound moves, compile then accepts it."""
    from runtime import hf_adapter

    model = solc.load_model("tiny-llama")
    assert not hf_adapter.extend_positions(model, 1000)  # within the bound: unchanged
    assert hf_adapter.max_positions(model) == 1024
    assert hf_adapter.extend_positions(model, 1100)
    sol = solc.compile(model, max_seq_len=1100)
    assert sol.max_seq_len == 1100


@pytest.mark.parametrize("actions, message", [
    (["attn", "bogus"], r"^actions=\['attn', 'bogus'\] is invalid: unknown axis 'bogus'; valid axes: \['attn', 'mlp', 'quant'\]$"),
    ([], r"^actions=\[\] is invalid: it is empty; enable at least one of \['attn', 'mlp', 'quant'\]$"),
    (("mlp", "mlp"), r"^actions=\('mlp', 'mlp'\) is invalid: duplicate axis 'mlp'"),
    ("attn,mlp", r"^actions='attn,mlp' is invalid: unknown axis 'attn,mlp'"),
    (["ATTN"], r"^actions=\['ATTN'\] is invalid: unknown axis 'ATTN'"),
])
def test_bad_actions_name_actions_and_show_the_value(actions, message):
    with pytest.raises(ArgumentError, match=message) as err:
        solc.compile(solc.load_model("tiny-llama"), actions=actions, max_seq_len=32)
    assert err.value.argument == "actions" and "axes" not in str(err.value).split(";")[0]
