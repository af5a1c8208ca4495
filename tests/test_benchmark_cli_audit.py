"""The benchmark scripts as command-line tools (decode, generate_cost, cpu_program_ab, kernels, attention_cpu,
the A/B scripts): bad option values are refused with one line naming the option before anything loads or is
measured, files they did not write are left as they are, an interrupted run keeps what it measured, the
recorded command is the one that ran, and Ctrl-C or a refused argument from the command line ends with one
line, not a traceback."""
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import solc
from solc import ArgumentError

ROOT = Path(__file__).resolve().parents[1]


def _no_load(*a, **k):
    raise AssertionError("loaded a model or measured before checking the arguments")


def _script(*args, env=None, interrupt_after=None, timeout=120):
    """(exit status, stderr) of `python benchmarks/...` run as a user runs it (SIGINT handled by default,
    even where this test runs with it ignored); interrupt_after: seconds before a Ctrl-C."""
    proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, **(env or {})},
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    if interrupt_after is not None:
        try:
            proc.wait(interrupt_after)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=timeout)
    return proc.returncode, err


# -- decode.py ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def decode_bench(load_benchmark):
    return load_benchmark("decode")


@pytest.fixture
def decode_no_load(decode_bench, monkeypatch):
    monkeypatch.setattr(decode_bench, "measure_bandwidth", _no_load)
    monkeypatch.setattr(decode_bench.hf_adapter, "model_from_config", _no_load)
    monkeypatch.setattr(solc, "load_model", _no_load)
    return decode_bench


@pytest.mark.parametrize("args, option", [
    (["--contexts", "512,,4096"], "--contexts"), (["--contexts", "0"], "--contexts"), (["--batch", "0"], "--batch"),
    (["--threads", "0"], "--threads"), (["--mixed-batch", "x"], "--mixed-batch"), (["--steps", "0"], "--steps"),
    (["--rounds", "-1"], "--rounds"), (["--warmup", "-1"], "--warmup"), (["--bandwidth-mib", "0"], "--bandwidth-mib"),
    (["--generate-rounds", "0"], "--generate-rounds"), (["--prompt-len", "0"], "--prompt-len"),
    (["--budget", "2"], "--budget"), (["--generate-budget", "0"], "--generate-budget"),
    (["--actions", "99"], "--actions"), (["--actions", "1,,2"], "--actions"), (["--actions", "x"], "--actions"),
    (["--device", "foo"], "--device"),
])
def test_decode_refuses_bad_values_before_loading(decode_no_load, tmp_path, capsys, args, option):
    with pytest.raises(SystemExit) as e:
        decode_no_load.main(["--quick", *args, "--out", str(tmp_path)])
    assert e.value.code == 2
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert ": error: " in last and option in last and len(last) < 200
    assert not any(tmp_path.iterdir())


def test_decode_leaves_files_it_did_not_write(decode_no_load, tmp_path, capsys):
    bench = decode_no_load
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(SystemExit):
        bench.main(["--quick", "--out", str(notes)])
    assert "--out=" in capsys.readouterr().err and notes.read_text() == "my notes"
    for name, text in (("decode_cpu_smollm2-135m_x.json", '{"mine": 1}'), ("decode_cpu_smollm2-135m_x.csv", "mine\n")):
        mine = tmp_path / name
        mine.write_text(text)
        with pytest.raises(ArgumentError, match=f"{name}.* exists and is not a result of `python benchmarks/decode.py`"):
            bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--tag", "x"])
        assert mine.read_text() == text
        mine.unlink()
    # its own earlier result (JSON and CSV as write_outputs writes them) is written over: the run goes on
    meta = {"command": "python benchmarks/decode.py --quick", "complete": False, "device": "cpu", "torch": "t",
            "date": "d", "model": "m", "weights": "w", "dtype": "float32", "mode": "eager", "bandwidth": {"read_gbps": 1.0}}
    bench.write_outputs(tmp_path, "decode_cpu_smollm2-135m_x", meta, [], "")
    with pytest.raises(AssertionError, match="before checking the arguments"):
        bench.main(["--quick", "--device", "cpu", "--out", str(tmp_path), "--tag", "x"])


def test_decode_ctrl_c_while_loading_is_one_line(tmp_path):
    """Ctrl-C while the model is built (seconds): one line and exit 130, no traceback, nothing written."""
    status, err = _script("benchmarks/decode.py", "--quick", "--batch", "1", "--contexts", "64", "--no-hf",
                          "--no-policy", "--threads", "1", "--bandwidth-mib", "16", "--out", str(tmp_path),
                          interrupt_after=4)
    assert status == 130, err
    assert "Traceback" not in err
    assert err.strip().splitlines() == [err.strip().splitlines()[0]]
    assert err.strip().startswith("decode.py: interrupted") and "nothing was written" in err
    assert not any(tmp_path.iterdir())


# -- generate_cost.py ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cost_policy(tmp_path_factory):
    from runtime.budget import BudgetSpec
    from runtime.cost_model import BytesCostModel
    from runtime.policy import PolicyConfig, PolicyNet

    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=64)
    torch.manual_seed(0)
    spec = BudgetSpec.cost(BytesCostModel.for_model(sol), context=24)
    path = tmp_path_factory.mktemp("policy") / "policy.pt"
    PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=2, budget=spec)).save(path)
    return path


def _cost_args(policy, out, *extra):
    return ["--model", "tiny-llama", "--corpus", "random", "--policy", str(policy), "--prompt-len", "24",
            "--new-tokens", "4", "--repeats", "1", "--threads", "1", "--calibration-rounds", "1", "--out", str(out), *extra]


@pytest.mark.parametrize("args, message", [
    (["--threads", "0"], "--threads=0 is invalid"), (["--new-tokens", "1"], "--new-tokens=1 is invalid"),
    (["--new-tokens", "0"], "--new-tokens=0 is invalid"), (["--calibration-rounds", "0"], "--calibration-rounds=0 is invalid"),
    (["--prompt-len", "0"], "--prompt-len=0 is invalid"), (["--budget", "2"], "--budget=2.0 is outside the feasible"),
    (["--budget", "0.1"], "--budget=0.1 is outside the feasible"), (["--policy", "nope.pt"], "--policy='nope.pt' is invalid"),
])
def test_generate_cost_refuses_bad_values_before_loading(load_benchmark, monkeypatch, tmp_path, capsys, cost_policy,
                                                         args, message):
    import training.grpo

    bench = load_benchmark("generate_cost")
    monkeypatch.setattr(training.grpo, "build_model", _no_load)
    monkeypatch.setattr(solc, "calibrate_cost_model", _no_load)
    with pytest.raises(SystemExit) as e:
        bench.main(_cost_args(cost_policy, tmp_path / "out", *args))
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_generate_cost_names_its_own_options_for_a_prompt_too_long(load_benchmark, monkeypatch, tmp_path, capsys, cost_policy):
    bench = load_benchmark("generate_cost")
    monkeypatch.setattr(solc, "calibrate_cost_model", _no_load)
    with pytest.raises(SystemExit):
        bench.main(_cost_args(cost_policy, tmp_path, "--prompt-len", "5000"))
    assert "--prompt-len + --new-tokens = 5004 does not fit --model tiny-llama" in capsys.readouterr().err


def test_generate_cost_leaves_files_it_did_not_write(load_benchmark, monkeypatch, tmp_path, capsys, cost_policy):
    bench = load_benchmark("generate_cost")
    monkeypatch.setattr(solc, "calibrate_cost_model", _no_load)
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes")
    with pytest.raises(SystemExit):  # a file where the folder goes: refused before the calibration, not after it
        bench.main(_cost_args(cost_policy, notes))
    assert "--out=" in capsys.readouterr().err and notes.read_text() == "my notes"
    table = tmp_path / "generate_cost_cpu_x.csv"
    table.write_text("mine\n")
    with pytest.raises(ArgumentError, match="generate_cost_cpu_x.csv.* exists and is not a result of"):
        bench.main(_cost_args(cost_policy, tmp_path, "--tag", "x"))
    assert table.read_text() == "mine\n"


# -- cpu_program_ab.py --------------------------------------------------------------------------------
@pytest.fixture
def cpu_program_ab(load_benchmark, monkeypatch, tmp_path):
    for name in ("T", "CTX", "ACTS", "ROUNDS", "TAG", "OUT"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(solc, "load_model", _no_load)
    return load_benchmark("cpu_program_ab")  # importing it runs nothing


@pytest.mark.parametrize("name, value", [("T", "0"), ("ROUNDS", "0"), ("CTX", "-5"), ("ACTS", "99"), ("ACTS", "1,,2"),
                                         ("ROUNDS", "x")])
def test_cpu_program_ab_checks_its_environment_before_loading(cpu_program_ab, monkeypatch, name, value):
    monkeypatch.setenv(name, value)
    with pytest.raises(ArgumentError, match=f"^{name}={value} is invalid: expected"):
        cpu_program_ab.main()


def test_cpu_program_ab_help_prints_and_measures_nothing(cpu_program_ab, capsys):
    # it has no options: --help used to be ignored, and the run measured and wrote its result
    with pytest.raises(SystemExit) as done:  # the fixture makes a model load fail the test
        cpu_program_ab.main(["--help"])
    assert done.value.code == 0 and "Env (each checked before the" in capsys.readouterr().out
    with pytest.raises(SystemExit) as done:
        cpu_program_ab.main(["--rounds", "3"])
    assert done.value.code == 2 and "unrecognized arguments: --rounds 3" in capsys.readouterr().err


def test_cpu_program_ab_leaves_a_file_it_did_not_write(cpu_program_ab, monkeypatch, tmp_path):
    monkeypatch.setenv("TAG", "x")
    mine = tmp_path / "cpu_program_ab_t1_x.json"
    mine.write_text('{"mine": 1}')
    with pytest.raises(ArgumentError, match="cpu_program_ab_t1_x.json.* exists and is not a result of"):
        cpu_program_ab.main()
    assert mine.read_text() == '{"mine": 1}'
    # its own earlier result (the command recorded with the environment before it) is replaced: it goes on
    mine.write_text(json.dumps({"meta": {"command": "T=1 TAG=x python benchmarks/cpu_program_ab.py"}, "rows": []}))
    with pytest.raises(AssertionError, match="before checking the arguments"):
        cpu_program_ab.main()


# -- kernels.py ---------------------------------------------------------------------------------------
@pytest.fixture
def kernels(load_benchmark, monkeypatch):
    bench = load_benchmark("kernels")
    monkeypatch.setattr(bench, "cpu_sanity", _no_load)
    return bench


@pytest.mark.parametrize("args, option", [
    (["--sections", "mlp,foo"], "--sections"), (["--models", "llama"], "--models"), (["--contexts", "0"], "--contexts"),
    (["--mlp-keeps", "0,1.5"], "--mlp-keeps"), (["--attn-keeps", "0.1,,1"], "--attn-keeps"), (["--bits", "1"], "--bits"),
    (["--rows", "0"], "--rows"), (["--attn-batches", "x"], "--attn-batches"),
])
def test_kernels_refuses_bad_lists_on_any_machine(kernels, tmp_path, capsys, args, option):
    """Checked before the CPU sanity subset too: a typo is not an 'OK' that ran nothing asked for."""
    with pytest.raises(SystemExit) as e:
        kernels.main([*args, "--out", str(tmp_path)])
    assert e.value.code == 2 and f"error: {option}=" in capsys.readouterr().err


def test_kernels_quick_keeps_the_lists_given(kernels):
    args = kernels.parse_args(["--quick", "--contexts", "1024", "--sections", "attn"])
    assert args.contexts == "1024" and args.sections == "attn"
    assert args.attn_keeps == "0.1,1.0" and args.rows == "1,16"  # the lists not given: --quick's
    assert kernels.parse_args([]).contexts == "1024,2048,4096,8192,16384,32768"


def test_kernels_writes_each_section_as_it_finishes(kernels, monkeypatch, tmp_path):
    """A GPU run (faked here) writes its rows after every section: one stopped in its second section keeps
    the first's rows, marked incomplete, with the command that ran."""
    monkeypatch.setattr(kernels, "HAS_CUDA", True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")

    def first(args, dtype, dev, graph, rows):
        rows.append(dict(section="quant", model="smollm2-135m", rows=1, level=5.0, dense_us=2.0, kernel_us=1.0,
                         speedup=2.0, max_err=0.0))

    def stop(*a):
        raise KeyboardInterrupt
    monkeypatch.setitem(kernels.RUNNERS, "quant", first)
    monkeypatch.setitem(kernels.RUNNERS, "attn", stop)
    with pytest.raises(KeyboardInterrupt):
        kernels.main(["--sections", "quant,attn", "--out", str(tmp_path)])
    (saved,) = tmp_path.glob("kernels-*.json")
    data = json.loads(saved.read_text())
    assert data["meta"]["complete"] is False and data["meta"]["sections_done"] == ["quant"]
    assert data["meta"]["command"] == f"python benchmarks/kernels.py --sections quant,attn --out {tmp_path}"
    assert [r["section"] for r in data["rows"]] == ["quant"]
    assert saved.with_suffix(".csv").read_text().startswith("# command: python benchmarks/kernels.py --sections quant,attn")
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".csv", ".json"]  # no temporary left
    monkeypatch.setitem(kernels.RUNNERS, "attn", first)
    for p in tmp_path.iterdir():
        p.unlink()
    assert kernels.main(["--sections", "quant,attn", "--out", str(tmp_path)]) == 0
    (saved,) = tmp_path.glob("kernels-*.json")
    assert json.loads(saved.read_text())["meta"]["complete"] is True


# -- attention_cpu.py and the A/B scripts -------------------------------------------------------------
def test_attention_cpu_keeps_a_tag_with_a_dot(load_benchmark, tmp_path):
    """--tag v1.5 names attention_cpu_random_v1.5.json (it wrote attention_cpu_random_v1.json, where
    --tag v1.6 then wrote over it)."""
    bench = load_benchmark("attention_cpu")
    small = ["--contexts", "32", "--keeps", "1", "--threads", "1", "--rounds", "1", "--out", str(tmp_path)]
    bench.main([*small, "--tag", "v1.5"])
    bench.main([*small, "--tag", "v1.6"])
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "attention_cpu_random_v1.5.csv", "attention_cpu_random_v1.5.json",
        "attention_cpu_random_v1.6.csv", "attention_cpu_random_v1.6.json"]
    assert json.loads((tmp_path / "attention_cpu_random_v1.5.json").read_text())["command"].endswith("--tag v1.5")


@pytest.mark.parametrize("script, args, name", [
    ("linear_ab.py", ["--base", "HEAD"], "linear_ab.json"),
    ("attention_cpu.py", ["--contexts", "32"], "attention_cpu_random.json"),
])
def test_a_refused_output_is_one_line_from_the_command_line(tmp_path, script, args, name):
    (tmp_path / name).write_text('{"mine": 1}')
    status, err = _script(f"benchmarks/{script}", *args, "--out", str(tmp_path))
    assert status == 2 and "Traceback" not in err
    assert err.strip() == (f"{script}: error: --out/--tag {str(tmp_path / name)!r} exists and is not a result of "
                           f"`python benchmarks/{script}`; it is left as it is: pass a new path")
    assert (tmp_path / name).read_text() == '{"mine": 1}'


def test_a_tag_with_a_slash_is_refused(tmp_path, load_benchmark):
    import argparse

    bench_cli = load_benchmark("bench_cli")
    with pytest.raises(ArgumentError, match=r"--tag makes the result name 'decode_cpu_m_../x'"):
        bench_cli.check_outputs(argparse.ArgumentParser(), tmp_path / "out", "decode_cpu_m_../x", "decode.py")
    assert not (tmp_path / "x.json").exists()
