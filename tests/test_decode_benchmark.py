"""benchmarks/decode.py --kv text: every row of the benchmark's cache holds the model's own cache of the
corpus text (keys as HF computes them, page statistics as the reference computes them), and a second
thread count reuses the prefill instead of running it again."""
import pytest
import torch

import solc
from runtime.ops.reference import page_stats
from solc import data


@pytest.fixture(scope="module")
def decode_bench(load_benchmark):
    return load_benchmark("decode")


@pytest.mark.slow
def test_text_cache_is_the_models_cache_of_the_text_in_every_row(decode_bench, monkeypatch):
    model = solc.load_model("smollm2-135m")
    sol = solc.compile(model, max_seq_len=96)
    context = 40  # a partial last page
    cache = sol.new_cache(2, 80)
    held = {}
    decode_bench.fill_text(sol, cache, context, held)

    ids = data.get_contexts(solc.load_tokenizer("smollm2-135m"), split="train", length=context, max_contexts=1)
    with torch.no_grad():
        hf = model(ids, use_cache=True).past_key_values
    lengths = torch.tensor([context, context])
    for layer in (0, len(cache.tensors) // 4 - 1):
        k, v, low, high = cache.tensors[4 * layer: 4 * layer + 4]
        assert torch.equal(k[0], k[1]) and torch.equal(v[0], v[1])
        torch.testing.assert_close(k[:1, :, :context], hf.layers[layer].keys, atol=1e-4, rtol=0)
        torch.testing.assert_close(v[:1, :, :context], hf.layers[layer].values, atol=1e-4, rtol=0)
        assert not k[:, :, context:].any()  # nothing past the context
        want_low, want_high = page_stats(k, lengths)
        assert torch.equal(low, want_low) and torch.equal(high, want_high)

    # another thread count: the held prefill, not a second one
    monkeypatch.setattr(data, "get_contexts", lambda *a, **k: pytest.fail("prefilled twice"))
    again = sol.new_cache(2, 80)
    decode_bench.fill_text(sol, again, context, held)
    assert all(torch.equal(a, b) for a, b in zip(again.tensors, cache.tensors))
