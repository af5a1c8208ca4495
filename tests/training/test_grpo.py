"""GRPO: rewards, penalties, advantages, and whole runs (resume, data parallel, logging, NaN stop)."""
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

import training.episodes as training_episodes
import training.grpo as grpo
from runtime.policy import PolicyNet
from training.episodes import Episodes
from training.grpo import (
    GRPOConfig,
    TrainingDiverged,
    budget_penalty,
    config_from_args,
    discounted_returns,
    group_centered,
    grpo_advantages,
    train,
    whiten,
)

REPO = Path(__file__).resolve().parents[2]


def test_discounted_returns_by_hand():
    r = torch.tensor([[1.0, 2.0, 4.0]], dtype=torch.float64)
    g = 0.5
    expected = torch.tensor([[1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4, 4.0]], dtype=torch.float64)
    torch.testing.assert_close(discounted_returns(r, g), expected)


def test_budget_penalty_formula():
    budget = torch.tensor([[0.50, 0.80, 0.50], [0.30, 0.41, 1.00]], dtype=torch.float64)
    target = torch.tensor([[0.40, 0.81, 0.75], [0.30, 0.40, 0.3125]], dtype=torch.float64)
    # row 0: attn |0.1|-0.02 = 0.08 -> 100*0.0064; mlp 0.01 < tol -> 0; quant 0.25-0.02 = 0.23 -> 200*0.0529
    # row 1: attn 0; mlp 0.01 -> 0; quant 0.6875-0.02 = 0.6675 -> 200*0.6675^2
    expected = torch.tensor([0.64 + 10.58, 200 * 0.6675**2], dtype=torch.float64)
    got = budget_penalty(budget, target, [100, 100, 200], 0.02)
    torch.testing.assert_close(got, expected)
    # disabled axes are not penalised
    got_mlp = budget_penalty(budget, target, [100, 100, 200], 0.02, axes=("mlp",))
    torch.testing.assert_close(got_mlp, torch.zeros(2, dtype=torch.float64))


def test_advantages_hand_computed():
    """2 contexts x K=2 schedules x T=2 steps, gamma 0.5, one penalised schedule."""
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -2.0], [-1.0, -1.0], [-1.0, -1.0]])
    budget = torch.tensor([[0.5, 1, 1], [0.5, 1, 1], [0.5, 1, 1], [0.8, 1, 1]], dtype=torch.float64)
    targets = torch.tensor([[0.5, 1, 1]] * 4, dtype=torch.float64)
    ep = Episodes(logp=logp, actions=torch.zeros(4, 2, dtype=torch.long), controlled=torch.ones(4, 2, dtype=torch.bool),
                  budget=budget, targets=targets, tokens=torch.zeros(4, 2, dtype=torch.long), group=2, prefill_len=5)
    cfg = GRPOConfig(gamma=0.5, alpha_attn=100, budget_tolerance=0.02, budget_mode="per-axis")
    out = grpo_advantages(ep, cfg, ("attn", "mlp", "quant"))
    # a cost budget: column 0 is the cost, one penalty weighted by alpha_cost, the other columns ignored
    cost_cfg = GRPOConfig(gamma=0.5, alpha_cost=100, alpha_mlp=1e6, budget_tolerance=0.02, budget_mode="cost")
    cost_out = grpo_advantages(ep, cost_cfg, (True, False, False))
    torch.testing.assert_close(cost_out["penalty"], torch.tensor([0, 0, 0, 7.84], dtype=torch.float64))
    # returns: [-2, -2], [-4, -2], [-1.5, -1], [-1.5, -1]; penalty of row 3: 100*(0.3-0.02)^2 = 7.84
    torch.testing.assert_close(out["returns"], torch.tensor([[-2.0, -2.0], [-4.0, -2.0], [-1.5, -1.0], [-1.5, -1.0]], dtype=torch.float64))
    torch.testing.assert_close(out["penalty"], torch.tensor([0, 0, 0, 7.84], dtype=torch.float64))
    # centred per (context, step): ctx0 step0 mean -3 -> +1,-1; step1 mean -2 -> 0,0;
    # ctx1 totals [-1.5,-1],[-9.34,-8.84] -> step0 mean -5.42 -> +3.92,-3.92; step1 mean -4.92 -> same
    centred = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [3.92, 3.92], [-3.92, -3.92]], dtype=torch.float64)
    torch.testing.assert_close(group_centered(out["returns"] - out["penalty"][:, None], 2), centred)
    std = (centred**2).mean().sqrt()  # mean is 0
    torch.testing.assert_close(out["advantages"], centred / std, atol=1e-7, rtol=0)


def test_whiten_ignores_masked_entries():
    v = torch.tensor([[1.0, 3.0, 100.0]])
    m = torch.tensor([[True, True, False]])
    torch.testing.assert_close(whiten(v, m), torch.tensor([[-1.0, 1.0, 0.0]]), atol=1e-6, rtol=0)


def _cfg(out, **kw):
    base = dict(model="tiny-llama", corpus="random", context_length=24, horizon=4, group_size=4, contexts_per_update=2,
                rollout_batch=2, max_contexts=8, policy_d_model=32, policy_heads=4, max_updates=4, checkpoint_every=1,
                ppo_epochs=2, ppo_minibatches=2, lr=1e-3, out=str(out), progress=False, max_minutes=0)
    base.update(kw)
    return GRPOConfig(**base)


def _state(path):
    return torch.load(path, weights_only=False)


def test_tiny_end_to_end_writes_checkpoints_and_tensorboard(tmp_path, tiny_sol):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = train(_cfg(tmp_path, max_updates=3), sol=tiny_sol)
    assert trainer.update == 3
    ckpt = _state(tmp_path / "checkpoint.pt")
    assert ckpt["update"] == 3 and "optimizer" in ckpt and "rng" in ckpt
    policy = PolicyNet.load(tmp_path / "policy.pt")
    for k, v in policy.state_dict().items():
        assert torch.equal(v, trainer.policy.state_dict()[k])
    assert json.loads((tmp_path / "config.json").read_text())["max_updates"] == 3
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for tag in ("reward/total", "reward/task", "reward/penalty", "policy/entropy", "policy/clip_fraction",
                "optim/grad_norm", "perf/episodes_per_s", "budget/cost/realized", "budget/cost/target",
                "budget/cost/abs_error"):
        assert tag in tags, tag
    assert [e.step for e in acc.Scalars("reward/task")] == [1, 2, 3]
    task = [e.value for e in acc.Scalars("reward/task")]
    assert all(-20 < v < 0 for v in task)
    ent = acc.Scalars("policy/entropy")[0].value
    assert 0 < ent <= torch.log(torch.tensor(27.0)).item() + 1e-4
    # the default budget is one cost fraction: what ran lies between the cheapest action's cost and dense
    lo, hi = trainer.spec.feasible_range(trainer.space)
    realized = acc.Scalars("budget/cost/realized")[0].value
    assert lo - 1e-6 <= realized <= hi + 1e-6


def test_resume_reproduces_uninterrupted_run(tmp_path, tiny_sol):
    full = train(_cfg(tmp_path / "full", max_updates=4), sol=tiny_sol)
    train(_cfg(tmp_path / "cut", max_updates=2), sol=tiny_sol)
    resumed = train(_cfg(tmp_path / "cut", max_updates=4, resume=True), sol=tiny_sol)
    assert resumed.update == 4
    a, b = full.policy.state_dict(), resumed.policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(tmp_path / "cut" / "tb"))
    acc.Reload()
    assert [e.step for e in acc.Scalars("reward/task")] == [1, 2, 3, 4]
    opt_a = _state(tmp_path / "full" / "checkpoint.pt")["optimizer"]["state"]
    opt_b = _state(tmp_path / "cut" / "checkpoint.pt")["optimizer"]["state"]
    assert all(torch.equal(opt_a[i]["exp_avg"], opt_b[i]["exp_avg"]) for i in opt_a)


def _signal_during_update(monkeypatch, update: int, times: int = 1, sig=signal.SIGINT):
    """Trainer.step sends `sig` to this process `times` times while it runs update `update` (0-based)."""
    real = grpo.Trainer.step

    def step(self, u):
        out = real(self, u)
        if u == update:
            for _ in range(times):
                os.kill(os.getpid(), sig)
        return out
    monkeypatch.setattr(grpo.Trainer, "step", step)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_stop_request_finishes_the_update_checkpoints_and_resumes_exactly(tmp_path, tiny_sol, monkeypatch, sig):
    """Ctrl-C (or a scheduler's SIGTERM) in update 2 lets it finish, writes a checkpoint although
    checkpoint_every is far off, and stops; --resume then gives the uninterrupted run's policy. The
    handlers are restored afterwards."""
    before = signal.getsignal(sig)
    _signal_during_update(monkeypatch, update=1, sig=sig)
    with pytest.raises(grpo.TrainingStopped) as stopped:  # a KeyboardInterrupt: a script around train stops too
        train(_cfg(tmp_path / "cut", max_updates=4, checkpoint_every=100), sol=tiny_sol)
    assert stopped.value.update == 2 and isinstance(stopped.value, KeyboardInterrupt)
    assert _state(tmp_path / "cut" / "checkpoint.pt")["update"] == 2
    assert signal.getsignal(sig) is before
    monkeypatch.undo()
    resumed = train(_cfg(tmp_path / "cut", max_updates=4, checkpoint_every=100, resume=True), sol=tiny_sol)
    full = train(_cfg(tmp_path / "full", max_updates=4, checkpoint_every=100), sol=tiny_sol)
    assert not resumed.interrupted and resumed.update == 4
    a, b = full.policy.state_dict(), resumed.policy.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_stop_request_aborts_at_once(tmp_path, tiny_sol, monkeypatch):
    before = signal.getsignal(signal.SIGINT)
    _signal_during_update(monkeypatch, update=0, times=2)
    with pytest.raises(KeyboardInterrupt) as aborted:
        train(_cfg(tmp_path / "run", max_updates=4, checkpoint_every=100), sol=tiny_sol)
    assert not isinstance(aborted.value, grpo.TrainingStopped)
    assert not (tmp_path / "run" / "checkpoint.pt").exists()  # no checkpoint of a half-done update
    assert signal.getsignal(signal.SIGINT) is before


def test_the_cli_exits_130_after_a_stop_request(tmp_path, monkeypatch, capsys):
    _signal_during_update(monkeypatch, update=0)
    cfg = _cfg(tmp_path / "run", max_updates=4, checkpoint_every=100)
    argv = [f"--{k.replace('_', '-')}={v}" for k, v in vars(cfg).items()
            if k in ("model", "corpus", "context_length", "horizon", "group_size", "contexts_per_update", "rollout_batch",
                     "max_contexts", "policy_d_model", "policy_heads", "max_updates", "checkpoint_every", "out")]
    assert grpo.main(argv + ["--no-progress"]) == 130
    err = capsys.readouterr().err
    assert "stopped on request after 1 update;" in err and "--resume" in err
    assert (tmp_path / "run" / "checkpoint.pt").exists()


def test_non_finite_reward_stops_and_keeps_last_checkpoint(tmp_path, tiny_sol, monkeypatch):
    train(_cfg(tmp_path, max_updates=2), sol=tiny_sol)
    before = (tmp_path / "checkpoint.pt").read_bytes()
    real = grpo.discounted_returns
    monkeypatch.setattr(grpo, "discounted_returns", lambda r, g: real(r, g) * float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite reward at update 2"):
        train(_cfg(tmp_path, max_updates=4, resume=True), sol=tiny_sol)
    assert (tmp_path / "checkpoint.pt").read_bytes() == before
    assert _state(tmp_path / "checkpoint.pt")["update"] == 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    train(_cfg(out, max_updates=2, threads=1))
    torch.distributed.destroy_process_group()


def test_two_process_gloo_equals_one_process(tmp_path):
    one = tmp_path / "one"
    torch.set_num_threads(1)
    try:
        single = train(_cfg(one, max_updates=2, threads=1))
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    two = tmp_path / "two"
    mp.start_processes(_ddp_worker, args=(2, _free_port(), str(two)), nprocs=2, join=True, start_method="spawn")
    a = single.policy.state_dict()
    b = PolicyNet.load(two / "policy.pt").state_dict()
    diffs = {k: (a[k] - b[k]).abs().max().item() for k in a}
    assert max(diffs.values()) < 1e-5, diffs
    changed = PolicyNet.load(one / "policy.pt").state_dict()
    assert any(not torch.equal(changed[k], v) for k, v in PolicyNet(single.policy.config).state_dict().items() if "head" in k)


def test_cli_help_config_file_and_overrides(tmp_path):
    help_text = subprocess.run([sys.executable, "-m", "training.grpo", "--help"], capture_output=True, text=True, cwd=REPO,
                               env={**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])})
    assert help_text.returncode == 0, help_text.stderr
    for f in grpo.fields(GRPOConfig):
        assert "--" + f.name.replace("_", "-") in help_text.stdout
    (tmp_path / "c.yaml").write_text("lr: 0.003\ngroup_size: 8\nactions: [mlp, quant]\n")
    cfg = config_from_args(["--config", str(tmp_path / "c.yaml"), "--lr", "0.01", "--target-mlp", "0.5,0.9"])
    assert cfg.lr == 0.01 and cfg.group_size == 8 and cfg.actions == ["mlp", "quant"] and cfg.target_mlp == [0.5, 0.9]
    (tmp_path / "c.json").write_text(json.dumps({"max-updates": 7, "levels": {"quant": [4, 8, 16]}}))
    cfg = config_from_args(["--config", str(tmp_path / "c.json"), "--no-progress"])
    assert cfg.max_updates == 7 and cfg.levels == {"quant": [4, 8, 16]} and cfg.progress is False
    assert config_from_args([]).model == "smollm2-135m" and config_from_args([]).context_length == 256
    with pytest.raises(ValueError, match="unknown config keys"):
        GRPOConfig.from_dict({"learning_rate": 1})


def test_quant_mode_option_picks_the_grid_and_the_quant_target_range():
    from runtime.actions import ActionSpace
    from runtime.errors import ArgumentError

    paper = GRPOConfig(quant="activation", levels={"quant": [5, 7, 16]})
    assert "quant" not in paper.target_ranges  # derived from the grid: 5/16
    assert GRPOConfig(target_quant="0.5,1").target_ranges["quant"] == [0.5, 1.0]
    with pytest.raises(ArgumentError, match="--levels") as bad_levels:
        GRPOConfig(levels={"quant": [5, 7, 16]})  # weight mode has bits 4/8/16 only
    assert bad_levels.value.argument == "--levels"
    with pytest.raises(ArgumentError, match="quant mode") as bad_mode:
        GRPOConfig(quant="fp8")
    assert bad_mode.value.argument == "--quant"
    targets = training_episodes.sample_targets(ActionSpace(quant="weight"), 500, torch.Generator().manual_seed(0))
    assert 0.25 <= targets[:, 2].min() < 0.26


def test_budget_guard_option_sets_the_policy_band_and_old_runs_resume_without_it(tmp_path, tiny_sol):
    assert grpo.build_policy(_cfg(tmp_path), tiny_sol).config.budget_band == 0.02
    assert grpo.build_policy(_cfg(tmp_path, budget_tolerance=0.03), tiny_sol).config.budget_band == 0.03
    assert grpo.build_policy(_cfg(tmp_path, budget_guard=False), tiny_sol).config.budget_band is None
    assert grpo.build_policy(_cfg(tmp_path, budget_mode="per-axis"), tiny_sol).config.budget_band is None
    assert config_from_args(["--no-budget-guard"]).budget_guard is False
    # a run whose config.json predates the option continues as it started: unguarded
    old = _cfg(tmp_path / "old").to_dict()
    del old["budget_guard"]
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "config.json").write_text(json.dumps(old))
    assert config_from_args(["--resume", "--out", str(tmp_path / "old")]).budget_guard is False
    # (with a checkpoint there, --budget-guard would be refused as a change of the run: test_robustness_cli.py)
    with pytest.raises(ValueError, match="budget-guard|budget_guard"):
        GRPOConfig(budget_guard="yes")
