"""benchmarks/kernels.py: the CPU path (sanity subset, exit 0) and every GPU section's code, run here on
tiny shapes with the timer stubbed (so the script does not rot while no session has a GPU)."""
import json

import pytest


@pytest.fixture(scope="module")
def bench_mod(load_benchmark):
    return load_benchmark("kernels")


def test_cpu_run_prints_skip_and_passes_sanity(bench_mod, capsys):
    if bench_mod.HAS_CUDA:
        pytest.skip("CUDA present: the script benchmarks instead")
    assert bench_mod.main([]) == 0
    out = capsys.readouterr().out
    assert "CUDA is not available" in out and "sanity: OK" in out


def test_every_section_runs_on_tiny_shapes(bench_mod, monkeypatch, tmp_path):
    import torch

    monkeypatch.setattr(bench_mod, "MODELS", {"tiny": dict(d=40, ffn=24, hq=4, hkv=2, hd=16)})
    monkeypatch.setattr(bench_mod, "bench", lambda fn, graph: (fn(), 2.0, None)[1:])
    args = bench_mod.parse_args(["--models", "tiny", "--rows", "2", "--mlp-keeps", "0.5", "--bits", "5",
                                 "--attn-keeps", "0.1", "--contexts", "40", "--attn-batches", "2",
                                 "--dtype", "float32", "--no-autotune", "--out", str(tmp_path)])
    rows = []
    dev = torch.device("cpu")
    with torch.no_grad():
        for section in ("mlp-in", "mlp", "quant", "attn"):
            {"mlp-in": bench_mod.run_mlp_in, "mlp": bench_mod.run_mlp, "quant": bench_mod.run_quant,
             "attn": bench_mod.run_attn}[section](args, torch.float32, dev, False, rows)
    assert {r["section"] for r in rows} == {"mlp-in", "mlp", "quant", "attn", "attn+append"}
    assert all(r["max_err"] < 1e-4 for r in rows)
    base, summary = bench_mod.write(args, rows, "cpu (test)")
    data = json.loads(base.with_suffix(".json").read_text())
    assert data["meta"]["device"] == "cpu (test)" and len(data["rows"]) == len(rows)
    assert base.with_suffix(".csv").read_text().startswith("# command:")
