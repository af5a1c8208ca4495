"""benchmarks/prefill.py: what it times is the prefill, and its rates follow from the model's size."""
import json

import pytest


def test_prefill_benchmark_times_both_prefills_and_counts_the_gemm_work(load_benchmark, tmp_path):
    import solc

    bench = load_benchmark("prefill")
    out = tmp_path / "p.json"
    assert bench.main(["--model", "tiny-llama", "--prompt-len", "16", "--threads", "1", "--rounds", "2",
                       "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    model = solc.load_model("tiny-llama")
    embedding = {id(t): t.numel() for t in (model.get_input_embeddings().weight, model.get_output_embeddings().weight)}
    gflop = 2 * (sum(t.numel() for t in model.parameters()) - sum(embedding.values())) * 16 / 1e9
    assert saved["meta"]["gflop"] == pytest.approx(gflop)
    (row,) = saved["rows"]
    assert row["threads"] == 1 and len(row["hf_rounds_ms"]) == len(row["solc_rounds_ms"]) == 2
    assert row["solc_gflops"] == pytest.approx(gflop / row["solc_ms"] * 1e3)
    assert row["solc_over_hf"] == pytest.approx(row["solc_ms"] / row["hf_ms"])
    assert saved["meta"]["command"].endswith(f"--out {out}")
