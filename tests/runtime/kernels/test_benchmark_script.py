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

    monkeypatch.setattr(bench_mod, "MODELS", {"tiny": dict(d=64, ffn=32, hq=4, hkv=2, hd=16)})
    monkeypatch.setattr(bench_mod, "bench", lambda fn, graph: (fn(), 2.0, None)[1:])
    args = bench_mod.parse_args(["--models", "tiny", "--rows", "2", "--mlp-keeps", "0.5", "--bits", "5",
                                 "--attn-keeps", "0.1", "--contexts", "40", "--attn-batches", "2",
                                 "--dtype", "float32", "--no-autotune", "--out", str(tmp_path)])
    rows = []
    dev = torch.device("cpu")
    with torch.no_grad():
        for section in ("mlp-in", "mlp", "quant", "lowbit", "attn"):
            {"mlp-in": bench_mod.run_mlp_in, "mlp": bench_mod.run_mlp, "quant": bench_mod.run_quant,
             "lowbit": bench_mod.run_lowbit, "attn": bench_mod.run_attn}[section](args, torch.float32, dev, False, rows)
    assert {r["section"] for r in rows} == {"mlp-in", "mlp", "quant", "lowbit", "attn", "attn+append"}
    assert all(r["max_err"] < 1e-4 for r in rows if r["section"] != "lowbit")
    lowbit = [r for r in rows if r["section"] == "lowbit"]  # bf16 roundings: a few bf16 ulps of outputs ~0.5
    assert sorted(r["level"] for r in lowbit) == [4.04, 4.1, 8.04, 8.1] and all(r["max_err"] < 0.02 for r in lowbit)
    base, summary = bench_mod.write(args, rows, "cpu (test)")
    data = json.loads(base.with_suffix(".json").read_text())
    assert data["meta"]["device"] == "cpu (test)" and len(data["rows"]) == len(rows)
    assert base.with_suffix(".csv").read_text().startswith("# command:")
