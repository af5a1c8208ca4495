"""The CPU benchmark scripts refuse bad option values and foreign output files with one line naming the
option, before anything is loaded or measured, and leave the user's files as they are."""
import json

import re

import pytest

from solc import ArgumentError


def _no_load(*a, **k):
    raise AssertionError("loaded a model before checking the arguments")


@pytest.mark.parametrize("args, option", [
    (["--batches", "0"], "--batches"), (["--batches", "129"], "--batches"), (["--batches", "x"], "--batches"),
    (["--top-p", "0.9,2"], "--top-p"), (["--top-p", "0"], "--top-p"), (["--temperatures", "0"], "--temperatures"),
    (["--rounds", "0"], "--rounds"), (["--rounds", "-1"], "--rounds"), (["--threads", "0"], "--threads"),
])
def test_sampling_refuses_bad_values_before_loading(load_benchmark, monkeypatch, tmp_path, capsys, args, option):
    bench = load_benchmark("sampling")
    monkeypatch.setattr(bench, "model_logits", _no_load)
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--out", str(tmp_path / "s.json")])
    assert e.value.code == 2
    assert f"error: {option}=" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


@pytest.mark.parametrize("name, args, option", [
    ("mlp_cpu", ["--rounds", "0"], "--rounds"), ("mlp_cpu", ["--inner", "0"], "--inner"),
    ("mlp_cpu", ["--threads", "1", "0"], "--threads"), ("mlp_cpu", ["--layer", "-1"], "--layer"),
    ("mlp_cpu", ["--context", "0"], "--context"),
    ("linear_cpu", ["--threads", "0"], "--threads"), ("linear_cpu", ["--batch", "-2"], "--batch"),
    ("linear_cpu", ["--steps", "0"], "--steps"), ("linear_cpu", ["--rounds", "0"], "--rounds"),
    ("linear_cpu", ["--context", "0"], "--context"),
])
def test_cpu_scripts_refuse_bad_values_before_loading(load_benchmark, monkeypatch, tmp_path, capsys, name, args, option):
    bench = load_benchmark(name)
    monkeypatch.setattr(bench.solc, "load_model", _no_load)
    with pytest.raises(SystemExit) as e:
        bench.main([*args, "--out", str(tmp_path / "r.json")])
    assert e.value.code == 2
    assert f"error: {option}=" in capsys.readouterr().err


@pytest.mark.parametrize("name", ["mlp_cpu", "linear_cpu", "sampling", "prefill"])
def test_cpu_scripts_leave_a_file_they_did_not_write(load_benchmark, monkeypatch, tmp_path, capsys, name):
    import solc

    bench = load_benchmark(name)
    monkeypatch.setattr(solc, "load_model", _no_load)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(SystemExit) as e:  # one line and exit 2, not a traceback
        bench.main(["--out", str(notes)])
    assert e.value.code == 2 and re.search("--out .*notes.txt.* exists and is not a result of", capsys.readouterr().err)
    assert notes.read_text() == "my notes"


def test_mlp_cpu_refuses_a_layer_the_model_lacks(load_benchmark, capsys, tmp_path):
    bench = load_benchmark("mlp_cpu")
    with pytest.raises(SystemExit):
        bench.main(["--model", "tiny-llama", "--layer", "99", "--out", str(tmp_path / "m.json")])
    assert "--layer=99 is invalid: expected an integer in 0..1" in capsys.readouterr().err


def test_attention_cpu_refuses_foreign_outputs_before_measuring(load_benchmark, monkeypatch, tmp_path, capsys):
    bench = load_benchmark("attention_cpu")
    monkeypatch.setattr(bench, "random_layers", _no_load)
    small = ["--contexts", "64", "--keeps", "1", "--threads", "1", "--rounds", "1"]
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(SystemExit):
        bench.main([*small, "--out", str(notes)])
    assert "--out=" in capsys.readouterr().err and notes.read_text() == "my notes"
    mine = tmp_path / "attention_cpu_random_x.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(ArgumentError, match="attention_cpu_random_x.json.* exists and is not a result of"):
        bench.main([*small, "--out", str(tmp_path), "--tag", "x"])
    assert mine.read_text() == '{"mine": 1}'
    mine.unlink()
    table = tmp_path / "attention_cpu_random_x.csv"
    table.write_text("mine\n")
    with pytest.raises(ArgumentError, match="attention_cpu_random_x.csv.* exists and is not a result of"):
        bench.main([*small, "--out", str(tmp_path), "--tag", "x"])
    assert table.read_text() == "mine\n"


def test_attention_cpu_writes_over_its_own_results(load_benchmark, tmp_path):
    bench = load_benchmark("attention_cpu")
    small = ["--contexts", "32", "--keeps", "1", "--threads", "1", "--rounds", "1", "--out", str(tmp_path), "--tag", "x"]
    bench.main(small)
    bench.main(small)  # the second run replaces the first's JSON and CSV
    assert json.loads((tmp_path / "attention_cpu_random_x.json").read_text())["command"].startswith(
        "python benchmarks/attention_cpu.py")


def test_ab_scripts_check_their_json_before_building(load_benchmark, tmp_path, capsys):
    kb = load_benchmark("kernel_build")
    p = kb.ab_parser("doc", rounds=1)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(SystemExit):
        kb.check_json(p, str(notes), "linear_ab", "", "linear_ab.py")
    assert "--out=" in capsys.readouterr().err
    (tmp_path / "linear_ab_t.json").write_text('{"mine": 1}')
    with pytest.raises(ArgumentError, match="linear_ab_t.json.* exists and is not a result of"):
        kb.check_json(p, str(tmp_path), "linear_ab", "t", "linear_ab.py")
    (tmp_path / "linear_ab.json").write_text(json.dumps({"command": "python benchmarks/linear_ab.py --base x"}))
    kb.check_json(p, str(tmp_path), "linear_ab", "", "linear_ab.py")  # its own earlier result: fine
    kb.check_json(p, str(tmp_path / "new"), "linear_ab", "", "linear_ab.py")  # a folder not made yet: fine
    kb.check_json(p, None, "linear_ab", "", "linear_ab.py")  # print only
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "linear_ab.py"), "--base", "HEAD", "--out", str(notes)],
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 2 and "--out=" in run.stderr and notes.read_text() == "my notes"
