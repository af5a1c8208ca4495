"""benchmarks/decode.py --kv text: every row of the benchmark's cache holds the model's own cache of the
corpus text (keys as HF computes them, page statistics as the reference computes them), and a second
thread count reuses the prefill instead of running it again; an interrupted run keeps its rows."""
import json

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


def test_an_interrupted_run_keeps_the_rows_it_measured(decode_bench, monkeypatch, tmp_path):
    """The results are written after every configuration, each file replaced whole: a run stopped in its
    second context leaves the first context's rows, marked incomplete, and no torn or temporary file."""
    run = decode_bench.Config.run
    calls = []

    def stop_at_the_second(self, actions):
        calls.append(self.context)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return run(self, actions)
    monkeypatch.setattr(decode_bench.Config, "run", stop_at_the_second)
    args = ["--quick", "--contexts", "64,96", "--batch", "1", "--no-hf", "--no-policy", "--actions", "26",
            "--threads", "1", "--bandwidth-mib", "16", "--out", str(tmp_path), "--tag", "cut"]
    with pytest.raises(KeyboardInterrupt):
        decode_bench.main(args)
    assert calls == [64, 96]
    saved = json.loads((tmp_path / "decode_cpu_smollm2-135m_cut.json").read_text())
    assert saved["meta"]["complete"] is False and saved["meta"]["command"].endswith("--tag cut")
    assert {r["context"] for r in saved["rows"]} == {64} and any(r["kind"] == "solc" for r in saved["rows"])
    csv_text = (tmp_path / "decode_cpu_smollm2-135m_cut.csv").read_text()
    assert csv_text.startswith("# complete: False")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decode_cpu_smollm2-135m_cut.csv", "decode_cpu_smollm2-135m_cut.json"]
    # what the command line's one-line Ctrl-C message says was kept (benchmarks/bench_cli.py)
    assert f"the results measured so far are in {tmp_path / 'decode_cpu_smollm2-135m_cut.json'}" in decode_bench.bench_cli.kept()
