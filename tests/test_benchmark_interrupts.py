"""benchmarks/generate_cost.py and benchmarks/training.py write their results after every timed round or
update: an interrupted run keeps what it finished, marked incomplete, and no torn or temporary file."""
import json

import pytest
import torch

import solc
from runtime.budget import BudgetSpec
from runtime.cost_model import BytesCostModel
from runtime.policy import PolicyConfig, PolicyNet


def test_an_interrupted_run_keeps_the_rounds_it_finished(load_benchmark, monkeypatch, tmp_path):
    bench = load_benchmark("generate_cost")
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=64)
    torch.manual_seed(0)
    spec = BudgetSpec.cost(BytesCostModel.for_model(sol), context=24)
    policy_path = tmp_path / "policy.pt"
    PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=2, budget=spec)).save(policy_path)
    out = tmp_path / "out"
    args = ["--model", "tiny-llama", "--corpus", "random", "--policy", str(policy_path), "--prompt-len", "24", "--new-tokens", "4",
            "--repeats", "3", "--threads", "1", "--calibration-rounds", "1", "--out", str(out), "--tag", "cut"]

    # the whole run: every round, complete
    assert bench.main(args) == 0
    whole = json.loads((out / "generate_cost_cpu_cut.json").read_text())
    assert whole["meta"]["complete"] is True and whole["meta"]["rounds_done"] == 3
    assert [len(r["wall_ms_all"]) for r in whole["rows"]] == [3, 3, 3, 3]
    assert set(whole["meta"]["decision_ms_side_by_side"]) == {"c", "op_by_op"}
    assert all(ms > 0 for ms in whole["meta"]["decision_ms_side_by_side"].values())

    # stopped in its third timed round (the fourth call of generate's "dense" row: 1 untimed + 2 timed)
    generate, calls = solc.SOLModel.generate, []

    def stop_in_round_three(self, *a, **k):
        if k.get("max_new_tokens") == 4 and "policy" not in k and k.get("budget") is None:
            calls.append(1)
            if len(calls) == 4:
                raise KeyboardInterrupt
        return generate(self, *a, **k)
    monkeypatch.setattr(solc.SOLModel, "generate", stop_in_round_three)
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    cut = json.loads((out / "generate_cost_cpu_cut.json").read_text())
    assert cut["meta"]["complete"] is False and cut["meta"]["rounds_done"] == 2
    assert cut["meta"]["command"].endswith("--tag cut")
    assert [r["row"] for r in cut["rows"]] == ["dense", "policy", "policy_op_by_op", "static"]
    assert [len(r["wall_ms_all"]) for r in cut["rows"]] == [2, 2, 2, 2]
    assert "complete: False" in (out / "generate_cost_cpu_cut.csv").read_text().splitlines()[0]
    assert sorted(p.name for p in out.iterdir()) == ["generate_cost_cpu_cut.csv", "generate_cost_cpu_cut.json"]


def test_an_interrupted_training_benchmark_keeps_the_updates_it_timed(load_benchmark, monkeypatch, tmp_path):
    bench = load_benchmark("training")
    step, done = bench.Trainer.step, []

    def stop_in_update_three(self, u):
        if u == 3:
            raise KeyboardInterrupt
        done.append(u)
        return step(self, u)
    monkeypatch.setattr(bench.Trainer, "step", stop_in_update_three)
    out = tmp_path / "training.json"
    args = ["--model", "tiny-llama", "--corpus", "random", "--context-length", "24", "--horizon", "4", "--group-size", "2",
            "--contexts-per-update", "1", "--rollout-batch", "1", "--threads", "1", "--updates", "4", "--json", str(out)]
    with pytest.raises(KeyboardInterrupt):
        bench.main(args)
    assert done == [0, 1, 2]  # the warm-up and two timed updates
    saved = json.loads(out.read_text())
    assert saved["complete"] is False and saved["timed_updates"] == 2 and saved["command"].endswith(str(out))
    assert saved["episodes_per_update"] == 2 and saved["episodes_per_s"] > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["training.json"]


def test_the_training_benchmark_leaves_a_json_another_tool_wrote(load_benchmark, tmp_path, capsys):
    bench = load_benchmark("training")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"command": "python -m training.evaluate", "rows": [1]}))
    with pytest.raises(SystemExit) as e:  # one line and exit 2, not a traceback
        bench.main(["--model", "tiny-llama", "--corpus", "random", "--json", str(other)])
    assert e.value.code == 2 and "--json" in capsys.readouterr().err
    assert json.loads(other.read_text()) == {"command": "python -m training.evaluate", "rows": [1]}
