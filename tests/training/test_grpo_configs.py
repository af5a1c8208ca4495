"""training.grpo under non-default settings: action grids, budgets, target ranges, config files and data
parallel set-up. A bad combination ends in one line naming the flag (exit 2) before the model loads."""
import json

import pytest
import torch

from runtime.errors import ArgumentError
from training import grpo
from training.grpo import GRPOConfig, config_from_args

TINY = ["--model", "tiny-llama", "--corpus", "random", "--context-length", "24", "--horizon", "4", "--group-size", "2",
        "--contexts-per-update", "2", "--rollout-batch", "2", "--max-contexts", "4", "--policy-d-model", "16",
        "--policy-heads", "2", "--ppo-epochs", "1", "--ppo-minibatches", "1", "--max-updates", "1", "--max-minutes", "0",
        "--no-progress", "--device", "cpu"]


def _refused(capsys, argv, out, flag, *says):
    """grpo.main(argv) exits 2 with one line naming `flag` and saying each of `says`; nothing is left at out."""
    assert grpo.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("grpo: error: ") and err.count("\n") == 1 and flag in err, err
    for text in says:
        assert text in err, (text, err)
    assert not out.exists()
    return err


def test_a_config_files_out_that_is_not_a_string_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "c.yaml").write_text("out: 5\n")
    _refused(capsys, ["--config", str(tmp_path / "c.yaml")], tmp_path / "5", "--out", "a non-empty string")
    (tmp_path / "c.json").write_text(json.dumps({"out": ["runs", "x"], "resume": True}))
    _refused(capsys, ["--config", str(tmp_path / "c.json")], tmp_path / "runs", "--out", "a non-empty string")


def test_yaml_numbers_with_an_exponent_are_numbers(tmp_path):
    """PyYAML reads `3e-4` (no dot) as a string; a config file means the number, as JSON and the CLI do."""
    (tmp_path / "c.yaml").write_text("lr: 3e-4\nweight_decay: 1E-3\nclip: +2.5e-1\nentropy_coef: .5e-1\n"
                                     "max_minutes: 1e1\ncorpus: e5\nmodel: '1e3'\n")
    cfg = config_from_args(["--config", str(tmp_path / "c.yaml")])
    assert (cfg.lr, cfg.weight_decay, cfg.clip, cfg.entropy_coef, cfg.max_minutes) == (3e-4, 1e-3, 0.25, 0.05, 10.0)
    assert cfg.corpus == "e5" and cfg.model == "1e3"  # not numbers: stay strings
    (tmp_path / "int.yaml").write_text("horizon: 1e1\n")  # a float still is no int
    with pytest.raises(ArgumentError, match="--horizon"):
        config_from_args(["--config", str(tmp_path / "int.yaml")])


def test_a_budget_tolerance_of_1_is_refused_before_the_model_loads(tmp_path, capsys):
    with pytest.raises(ArgumentError, match="--budget-tolerance") as bad:
        GRPOConfig(budget_tolerance=1.0)
    assert bad.value.argument == "--budget-tolerance"
    assert GRPOConfig(budget_tolerance=0.99).budget_tolerance == 0.99
    _refused(capsys, TINY + ["--out", str(tmp_path / "run"), "--budget-tolerance", "1"], tmp_path / "run",
             "--budget-tolerance", "< 1.0")


@pytest.mark.parametrize("levels, actions", [
    ({"attn": [1.0], "mlp": [1.0], "quant": [16]}, "attn,mlp,quant"),
    ({"mlp": [1.0]}, "mlp"),
])
def test_a_grid_of_only_the_dense_action_is_refused(tmp_path, capsys, levels, actions):
    with pytest.raises(ArgumentError, match="only the dense action") as bad:
        GRPOConfig(actions=actions, levels=levels)
    assert bad.value.argument == "--levels"
    out = tmp_path / "run"
    _refused(capsys, TINY + ["--out", str(out), "--actions", actions, "--levels", json.dumps(levels)], out, "--levels",
             "nothing to choose")
    assert GRPOConfig(actions="mlp", levels={"mlp": [0.5, 1.0]}).levels == {"mlp": [0.5, 1.0]}  # two actions: fine


def test_a_cost_budget_that_no_action_can_lower_is_refused(tmp_path, capsys):
    """Activation quant reads the weights' bytes at every bit width: under the bytes cost model every action
    costs 1, every sampled target would be 1 and the run would learn nothing about the budget."""
    out = tmp_path / "run"
    _refused(capsys, TINY + ["--out", str(out), "--actions", "quant", "--quant", "activation"], out, "--budget-mode",
             "costs 1.0000 of a dense step", "--budget-mode per-axis")


def test_target_ranges_the_budget_ignores_or_the_grid_cannot_meet_are_refused(tmp_path, capsys):
    out = tmp_path / "run"
    run = TINY + ["--out", str(out)]
    _refused(capsys, run + ["--target-attn", "0.3,0.6"], out, "--target-attn", "--budget-mode per-axis")
    _refused(capsys, run + ["--budget-mode", "per-axis", "--target-cost", "0.6,0.8"], out, "--target-cost",
             "--budget-mode cost")
    _refused(capsys, run + ["--budget-mode", "per-axis", "--actions", "attn", "--target-quant", "0.5,1"], out,
             "--target-quant", "enabled axis")
    _refused(capsys, run + ["--budget-mode", "per-axis", "--target-attn", "0.05,1"], out, "--target-attn",
             "within [0.1, 1]")
    _refused(capsys, run + ["--budget-mode", "per-axis", "--levels", '{"mlp": [0.6, 1.0]}', "--target-mlp", "0.4,1"],
             out, "--target-mlp", "within [0.6, 1]", "[0.6, 1.0]")
    _refused(capsys, run + ["--budget-mode", "per-axis", "--quant", "activation", "--target-quant", "0.25,1"], out,
             "--target-quant", "within [0.3125, 1]")


def test_per_axis_targets_follow_a_levels_grid(tmp_path):
    """Without --target-*, each enabled axis samples from its grid's cheapest level to 1: a grid without attn
    0.1 is never asked for less than it can do, a grid with mlp 0.2 is asked for all it can do."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = config_from_args(TINY + ["--out", str(tmp_path / "run"), "--budget-mode", "per-axis", "--actions", "attn,mlp",
                                   "--levels", '{"attn": [0.7, 1.0], "mlp": [0.2, 1.0]}', "--contexts-per-update", "8",
                                   "--rollout-batch", "8", "--max-contexts", "8", "--seed", "3"])
    trainer = grpo.train(cfg)
    targets = [grpo.sample_targets(trainer.space, 8, grpo._generator(cfg.seed, 4, u), cfg.target_ranges)
               for u in range(50)]
    targets = torch.cat(targets)
    assert targets[:, 0].min() >= 0.7 and targets[:, 0].min() < 0.72
    assert targets[:, 1].min() < 0.23 and targets[:, 2].eq(1.0).all()
    acc = EventAccumulator(str(tmp_path / "run" / "tb"))
    acc.Reload()
    assert acc.Scalars("budget/attn/target")[0].value >= 0.7


def test_contexts_per_update_must_split_over_the_ranks_in_one_line(tmp_path, capsys, monkeypatch):
    """torchrun --nproc_per_node=2 with --contexts-per-update 1: every rank says so in one line (exit 2),
    before the process group starts (no MASTER_ADDR here: it would fail differently) and the model loads."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    out = tmp_path / "run"
    _refused(capsys, TINY + ["--out", str(out), "--contexts-per-update", "3"], out, "--contexts-per-update",
             "a multiple of the number of ranks, 2")


@pytest.mark.parametrize("rank, says", [("0", True), ("1", False)])
def test_only_rank_0_reports_a_stop_request(tmp_path, capsys, monkeypatch, rank, says):
    """Every rank stops at the same update with TrainingStopped; the message is said once, by rank 0."""
    def stopped(cfg):
        raise grpo.TrainingStopped(3, tmp_path / "checkpoint.pt")

    monkeypatch.setattr(grpo, "train", stopped)
    monkeypatch.setenv("RANK", rank)
    assert grpo.main(TINY + ["--out", str(tmp_path / "run")]) == 130
    err = capsys.readouterr().err
    assert ("stopped on request after 3 updates" in err) is says and ("--resume" in err) is says


def test_a_text_corpus_with_a_tiny_model_names_corpus(tmp_path, capsys):
    """tiny-* models are random-init and have no tokenizer: the error says --corpus random, not "use token ids"."""
    out = tmp_path / "run"
    argv = [a for a in TINY if a != "random"]
    argv[argv.index("--corpus") + 1: argv.index("--corpus") + 1] = ["shakespeare"]
    _refused(capsys, argv + ["--out", str(out)], out, "--corpus", "--corpus random", "--model tiny-llama")


def test_an_anchor_sharpness_the_policy_cannot_start_at_is_one_line(tmp_path, capsys):
    """kappa starts as softplus(log(expm1(kappa))): beyond ~709 math.expm1 overflows (an OverflowError
    traceback from runtime/policy.py after the model loaded)."""
    out = tmp_path / "run"
    _refused(capsys, TINY + ["--out", str(out), "--policy-anchor-sharpness", "1000"], out, "--policy-anchor-sharpness",
             "<= 700")
    assert GRPOConfig(policy_anchor_sharpness=700.0).policy_anchor_sharpness == 700.0


def test_a_run_stored_with_the_default_grids_ranges_spelled_out_resumes(tmp_path, capsys):
    """Runs from before the per-axis ranges followed the grid stored attn 0.1,1 and mlp 0.4,1; with the default
    grid that is what an empty range samples, so their resume (through the API with today's defaults, or with
    the range given again) is not a change of the run; another range is."""
    out = tmp_path / "run"
    assert grpo.main(TINY + ["--out", str(out)]) == 0
    state = torch.load(out / "checkpoint.pt", weights_only=False)
    state["config"].update(target_attn=[0.1, 1.0], target_mlp=[0.4, 1.0])  # as those runs wrote it
    torch.save(state, out / "checkpoint.pt")
    cfg = config_from_args(TINY + ["--out", str(out), "--resume", "--max-updates", "2"])
    assert grpo.train(GRPOConfig(**{**cfg.to_dict(), "target_attn": [], "target_mlp": []})).update == 2
    assert grpo.main(TINY + ["--out", str(out), "--resume", "--max-updates", "3", "--target-attn", "0.1,1"]) == 0
    capsys.readouterr()
    assert grpo.main(TINY + ["--out", str(out), "--resume", "--max-updates", "4", "--target-attn", "0.2,1"]) == 2
    err = capsys.readouterr().err
    assert "--target-attn [0.2, 1.0] differs from the run's stored --target-attn [0.1, 1.0]" in err


def test_an_old_runs_config_json_starts_a_new_run(tmp_path):
    """A config.json written before the per-axis ranges followed the grid spells out attn 0.1,1 and mlp 0.4,1,
    also for a cost budget: as --config of a new run that is the default, not a range the budget ignores."""
    old = GRPOConfig().to_dict()
    old.update(target_attn=[0.1, 1.0], target_mlp=[0.4, 1.0], out=str(tmp_path / "old"))
    (tmp_path / "config.json").write_text(json.dumps(old))
    argv = TINY + ["--config", str(tmp_path / "config.json"), "--out", str(tmp_path / "new")]
    assert grpo.main(argv) == 0
    assert grpo.main(argv + ["--overwrite", "--budget-mode", "per-axis", "--actions", "mlp"]) == 0
    assert torch.load(tmp_path / "new" / "checkpoint.pt", weights_only=False)["update"] == 1


def test_cost_model_measured_calibrates_once_and_resume_reuses_the_table(tmp_path, monkeypatch):
    """--cost-model measured times the actions on this device at the start of a run, keeps the table in
    OUT/cost_model.json and prices the policy's budget with it; --resume reads that table (a second
    calibration could give other numbers than the ones the policy was trained against)."""
    import json

    import runtime.costs
    from runtime.cost_model import BytesCostModel, MeasuredCostModel, device_name
    from runtime.policy import PolicyNet
    from training import grpo

    out = tmp_path / "run"
    args = ["--model", "tiny-llama", "--corpus", "random", "--context-length", "24", "--horizon", "4",
            "--group-size", "2", "--contexts-per-update", "2", "--rollout-batch", "2", "--max-contexts", "4",
            "--policy-d-model", "16", "--policy-heads", "2", "--ppo-epochs", "1", "--ppo-minibatches", "1",
            "--max-minutes", "0", "--no-progress", "--device", "cpu", "--cost-model", "measured", "--out", str(out)]
    calls = []

    def calibrate(sol, contexts, batch, progress):  # a tiny model's timings are all overhead: a fixed table
        calls.append({"contexts": contexts, "batch": batch})
        costs = BytesCostModel.for_model(sol)
        return MeasuredCostModel(device_name("cpu"), batch, list(contexts),
                                 [[costs.step_cost(a, n) / 1e6 + 0.01 * len(calls) for n in contexts] for a in sol.space])
    monkeypatch.setattr(runtime.costs, "calibrate_cost_model", calibrate)
    assert grpo.main(args + ["--max-updates", "1"]) == 0
    table = json.loads((out / "cost_model.json").read_text())
    assert table["kind"] == "measured" and table["device"] == device_name("cpu") and table["contexts"] == [23]
    assert len(calls) == 1 and calls[0]["batch"] == 1
    spec = PolicyNet.load(out / "policy.pt").config.budget_spec
    assert spec.is_cost and spec.cost_model == table
    assert grpo.main(args + ["--max-updates", "2", "--resume"]) == 0
    assert len(calls) == 1 and json.loads((out / "cost_model.json").read_text()) == table
    assert PolicyNet.load(out / "policy.pt").config.budget_spec.cost_model == table
    (out / "cost_model.json").unlink()  # the checkpoint's policy config holds the table too
    assert grpo.main(args + ["--max-updates", "3", "--resume"]) == 0
    assert len(calls) == 1 and json.loads((out / "cost_model.json").read_text()) == table
    assert grpo.main(args + ["--max-updates", "1", "--overwrite"]) == 0  # a new run measures anew
    assert len(calls) == 2 and json.loads((out / "cost_model.json").read_text()) != table
