"""benchmarks/sampling.py: its table's counts are what the two masks do on the logits it was given."""
import json

import torch


def test_sampling_benchmark_counts_nuclei_and_mask_disagreements(load_benchmark, monkeypatch, tmp_path):
    bench = load_benchmark("sampling")
    logits = torch.zeros(4, 50)
    logits[:, 0] = 10.0  # one token holds > 0.99 of the mass: the nucleus is that token
    monkeypatch.setattr(bench, "model_logits", lambda positions: logits)
    out = tmp_path / "s.json"
    assert bench.main(["--batches", "1,2", "--top-p", "0.9", "--temperatures", "1.0", "--rounds", "2",
                       "--out", str(out)]) == 0
    saved = json.loads(out.read_text())
    assert [(r["batch"], r["top_p"]) for r in saved["rows"]] == [(1, 0.9), (2, 0.9)]
    for r in saved["rows"]:
        assert r["nucleus_median"] == r["nucleus_max"] == 1 and r["tokens_on_other_side"] == 0
        assert r["c_ms"] > 0 and r["torch_ms"] > 0
    assert saved["meta"]["command"].endswith(f"--out {out}")
    assert [(r["batch"], r["top_k"]) for r in saved["buffer_rows"]] == [(1, None), (1, 50), (2, None), (2, 50)]
    assert all(r["held_ms"] > 0 and r["fresh_ms"] > 0 for r in saved["buffer_rows"])
