"""GRPO over counterfactual compute schedules: train the SOL policy.

    python -m training.grpo                                   # SmolLM2-135M, Shakespeare, the defaults
    python -m training.grpo --config run.yaml --lr 3e-4       # a YAML/JSON config, then CLI overrides
    python -m training.grpo --out runs/x --resume             # continue exactly where runs/x stopped
    torchrun --nproc_per_node=2 -m training.grpo ...          # data parallel (gloo on CPU, nccl on GPU)

One update (DESIGN.md "Policy and training"):
  1. Rollouts. `contexts_per_update` training contexts (sharded across ranks); per context one cost
     target U[cheapest action's cost, 1] (the default cost budget) or, per axis, U[the grid's cheapest
     level, 1] (default grid: 0.1 attn, 0.4 mlp, bits/16 0.25 with --quant weight, 0.3125 with --quant
     activation) on enabled axes and 1.0 on disabled ones; one dense prefill, `group_size` (K) schedules sampled from the policy at the
     rollout temperature along the fixed ground-truth tokens for `horizon` (T) steps
     (training/episodes.py).
  2. Rewards. Per step r_t = log p(y_t) under the schedule; discounted returns
     G_t = sum_{s>=t} gamma^(s-t) r_s. Budget penalty per episode and enabled axis:
     alpha_axis * max(|realized_axis - target_axis| - tolerance, 0)^2. The penalty is a property of the
     whole episode (every action moves the realized mean), so it is charged to EVERY controlled step:
     R_t = G_t - penalty.
  3. Advantages (process-level GRPO). Per context and step, subtract the mean of R_t over its K
     schedules; then whiten all advantages of the global batch (all ranks) to mean 0, std 1.
  4. PPO. `ppo_epochs` passes over the episodes in `ppo_minibatches` minibatches (a fixed-seed
     permutation of the global episodes, identical on every rank): clipped surrogate
     (clip 0.2) + entropy bonus (0.05) of the tempered policy, AdamW (1e-4), gradients averaged over
     the global minibatch (all-reduced), clipped to norm 2.0. Log-probs are recomputed by a
     full-sequence forward over the stored policy inputs, at the rollout temperature.

All randomness is derived from (seed, update, global context index), so a run is reproducible,
independent of the number of ranks and of where it was interrupted (--resume replays exactly).
A non-finite reward, loss or gradient stops training with an error and does not touch the last
checkpoint. Ctrl-C (SIGINT) or SIGTERM lets the running update finish, writes a checkpoint and raises
TrainingStopped, a KeyboardInterrupt (every rank at the same update; the CLI exits with status 130); a
second one aborts at once. Only rank 0 logs and writes.

Outputs under --out: config.json, checkpoint.pt (latest: policy, optimizer, RNG states, update),
policy.pt (policy config + weights, what runtime.policy.PolicyNet.load reads), tb/ (TensorBoard), and
with --cost-model measured the latency table the run prices with, cost_model.json.
An --out that already holds a run is left alone unless --resume (continue it, with the options stored
in its checkpoint: only --max-updates, --max-minutes, --checkpoint-every, --rollout-batch, --threads,
--device and --progress may change) or --overwrite (replace it) says otherwise; a run holds OUT/.lock
while it lives, so a second run cannot use the same --out.
"""
from __future__ import annotations

import os
import signal
import sys

if __name__ == "__main__":  # before torch loads
    from training.startup import quiet_ctrl_c_while_loading

    quiet_ctrl_c_while_loading("grpo")

import argparse
import hashlib
import json
import math
import random
import threading
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch import Tensor

from runtime import validation
from runtime.actions import AXES, ActionSpace
from runtime.errors import ArgumentError, ArgumentTypeError, SolcError
from runtime.policy import BUDGET_HEADS, PolicyConfig, PolicyNet, PolicySource, Trajectory, sequence_log_probs
from solc.cache import atomic_torch_save, atomic_write_bytes, pid_alive, remove_stale_temporaries
from solc.models import DTYPES, resolve_device, resolve_dtype
from runtime.budget import BUDGET_MODES, BudgetSpec
from runtime.cost_model import BytesCostModel, cost_model_from_dict
from training.episodes import Episodes, default_target_ranges, rollout, sample_cost_targets, sample_targets
from training.startup import ctrl_c_raises

CHECKPOINT_VERSION = 1


class TrainingDiverged(RuntimeError):
    """A non-finite reward, loss or gradient: training stopped, the last checkpoint is intact."""


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (full or read-only disk): training stopped; what is on disk is
    the last checkpoint that was written whole."""

    def __init__(self, update: int, saved: int | None, out: Path, error: BaseException):
        kept = (f"the checkpoint of update {saved} in {out} is intact (--resume continues from it)" if saved is not None
                else "no checkpoint was written")
        import shutil

        try:
            free = f"; {shutil.disk_usage(out).free // 1024} KiB free there"
        except OSError:
            free = ""
        super().__init__(f"cannot write the checkpoint of update {update} to {out} ({_one_line(error)}{free}); {kept}")


class TrainingStopped(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped training after a finished update, whose checkpoint was written: the
    interrupt still reaches the caller (a script around `train` stops too), with nothing lost."""

    def __init__(self, update: int, checkpoint: Path):
        super().__init__(f"stopped on request after {update} update{'' if update == 1 else 's'}; "
                         f"checkpoint in {checkpoint}")
        self.update, self.checkpoint = update, checkpoint


def _opt(default, help: str, **kw):
    return field(default_factory=lambda: default, metadata={"help": help, **kw}) if isinstance(default, (list, dict)) else field(default=default, metadata={"help": help, **kw})


@dataclass
class GRPOConfig:
    # model and data
    model: str = _opt("smollm2-135m", "base model: a solc.load_model name (smollm2-135m, tiny-llama, ...) or a local HF path")
    actions: list = _opt(["attn", "mlp", "quant"], "enabled efficiency axes, comma separated (attn,mlp,quant)")
    levels: dict = _opt({}, 'per-axis level grids as JSON, e.g. \'{"quant": [4, 8]}\'; {} = the default grid')
    budget_mode: str = _opt("cost", "what a budget target means: cost (one number, the fraction of the dense decode cost; the policy picks the split) | per-axis (the paper's attn/mlp/bits targets)")
    cost_model: str = _opt("bytes", "cost model of a cost budget: bytes (analytic bytes a batch-1 step reads), measured (each action's decode-step latency at --context-length on this device, timed at the start of the run by solc.calibrate_cost_model and kept in OUT/cost_model.json, which --resume reuses), or the path of a cost model JSON (runtime.cost_model to_dict, e.g. a measured table)")
    quant: str = _opt("weight", "quant axis mode: weight (int8/int4 MLP weights, bits 4/8/16) or activation (the paper's, 5/7/16)")
    corpus: str = _opt("shakespeare", "training corpus for solc.data.get_contexts ('random' = uniform random tokens, for tests)")
    context_length: int = _opt(256, "tokens per context: dense prefill of L - T - 1 tokens, then T controlled steps")
    max_contexts: int = _opt(0, "use at most this many training contexts (0 = all)")
    dtype: str = _opt("float32", "base model dtype: float32 | float64 | bfloat16 | float16 (the policy runs in float64 with float64, else float32)")
    device: str = _opt("auto", "auto (cuda if available) | cpu | cuda | cuda:N")
    # episodes
    horizon: int = _opt(16, "T: controlled decode steps per episode")
    group_size: int = _opt(16, "K: counterfactual schedules per context, sharing one prefill")
    contexts_per_update: int = _opt(2, "contexts per update, global over all ranks (must divide by the world size)")
    rollout_batch: int = _opt(4, "contexts per rollout call (their K schedules are batched together)")
    target_attn: list = _opt([], "range lo,hi of the sampled attn keep target, within [the grid's cheapest keep, 1] (empty: all of it, 0.1 to 1 with the default grid)")
    target_mlp: list = _opt([], "range lo,hi of the sampled mlp keep target, within [the grid's cheapest keep, 1] (empty: all of it, 0.4 to 1 with the default grid)")
    target_quant: list = _opt([], "range lo,hi of the sampled bits/16 target, within [the grid's cheapest bits/16, 1] (empty: all of it)")
    target_cost: list = _opt([], "range lo,hi of the sampled cost target, within [the cheapest action's cost, 1] (empty: all of it)")
    # reward
    gamma: float = _opt(0.85, "discount of the per-step log-likelihood rewards")
    alpha_attn: float = _opt(100.0, "budget penalty weight, attn axis")
    alpha_mlp: float = _opt(100.0, "budget penalty weight, mlp axis")
    alpha_quant: float = _opt(200.0, "budget penalty weight, quant axis")
    alpha_cost: float = _opt(200.0, "budget penalty weight of a cost budget (the one penalty term)")
    budget_tolerance: float = _opt(0.02, "penalty-free band around each target: alpha*max(|mean-target|-tol,0)^2")
    budget_guard: bool = _opt(True, "cost budgets: mask every action that would take the episode's running cost deviation beyond --budget-tolerance, or leave the rest of the horizon unable to bring it back, in training and deployment alike (runtime.policy.budget_guard)")
    # optimisation
    temperature: float = _opt(1.3, "rollout temperature (the PPO ratio and entropy use the same one)")
    clip: float = _opt(0.2, "PPO ratio clip epsilon")
    entropy_coef: float = _opt(0.05, "entropy bonus coefficient")
    lr: float = _opt(1e-4, "AdamW learning rate")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    grad_clip: float = _opt(2.0, "gradient norm clip")
    ppo_epochs: int = _opt(4, "PPO passes over each update's episodes")
    ppo_minibatches: int = _opt(2, "minibatches per PPO pass (over episodes)")
    # policy network
    policy_d_model: int = _opt(512, "policy transformer width")
    policy_heads: int = _opt(4, "policy attention heads")
    policy_layers: int = _opt(1, "policy transformer layers")
    policy_mlp_ratio: float = _opt(4.0, "policy MLP expansion")
    policy_budget_head: str = _opt("anchored", "how the budget head enters the logits: anchored (quadratic prior around the needed cost) | price (linear cost price); see runtime/policy.py")
    policy_anchor_sharpness: float = _opt(20.0, "initial sharpness kappa of the anchored prior (at most 700: it starts as softplus(raw), and raw = log(exp(kappa) - 1) overflows beyond)")
    # run control
    max_updates: int = _opt(200, "stop after this many updates")
    max_minutes: float = _opt(17.0, "also stop (with a checkpoint) once training has run this long; 0 = no limit")
    checkpoint_every: int = _opt(5, "write checkpoint.pt and policy.pt every N updates (and at the end)")
    seed: int = _opt(0, "seed of every random choice (contexts, targets, schedules, init)")
    out: str = _opt("runs/grpo", "output directory (config.json, checkpoint.pt, policy.pt, tb/)")
    resume: bool = _opt(False, "continue from OUT/checkpoint.pt with the options stored there (only --max-updates, --max-minutes, --checkpoint-every, --rollout-batch, --threads, --device and --progress may change)")
    overwrite: bool = _opt(False, "replace the run OUT holds (its config.json, checkpoint.pt, policy.pt, tb/)")
    threads: int = _opt(0, "torch CPU threads (0 = torch's default)")
    progress: bool = _opt(True, "show a tqdm progress bar (rank 0)")

    def __post_init__(self):
        """Check every field; an error names it (as the CLI flag), its value and what is valid."""
        for name in ("model", "corpus", "out", "dtype", "device", "policy_budget_head"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                _bad(name, getattr(self, name), "a non-empty string", type_error=True)
        if isinstance(self.actions, str):
            self.actions = [a.strip() for a in self.actions.split(",") if a.strip()]
        if isinstance(self.levels, str):
            try:
                self.levels = json.loads(self.levels) if self.levels.strip() else {}
            except json.JSONDecodeError as e:
                _bad("levels", self.levels, f'JSON mapping an axis to its levels, e.g. \'{{"quant": [4, 8, 16]}}\' ({e})')
        if not isinstance(self.actions, list):
            _bad("actions", self.actions, "axis names, comma separated (attn,mlp,quant) or a list", type_error=True)
        if not isinstance(self.levels, dict):
            _bad("levels", self.levels, 'a JSON object mapping an axis to its levels, e.g. \'{"quant": [4, 8, 16]}\'',
                 type_error=True)
        try:
            space = ActionSpace(self.actions, self.levels or None, quant=self.quant)
        except ValueError as e:
            name = "quant" if "quant mode" in str(e) else "levels" if self.levels and "level" in str(e) else "actions"
            raise ArgumentError(_flag(name), f"{_flag(name)}: {e}") from None
        if len(space) == 1:  # nothing to choose, nothing to learn
            axis = space.axes[0]
            example = json.dumps({axis: list(ActionSpace([axis], quant=self.quant).levels[axis])})
            _bad("levels", json.dumps(self.levels), f"it leaves only the dense action on the enabled axes "
                 f"{list(space.axes)}, so the policy has nothing to choose: give an axis a cheaper level, e.g. {example}")
        if self.budget_mode not in BUDGET_MODES:
            _bad("budget_mode", self.budget_mode, f"one of {list(BUDGET_MODES)}")
        if not isinstance(self.cost_model, str) or not self.cost_model:
            _bad("cost_model", self.cost_model, "bytes, measured or the path of a cost model JSON file", type_error=True)
        if self.cost_model not in ("bytes", "measured") and not Path(self.cost_model).is_file():
            _bad("cost_model", self.cost_model, "bytes, measured or the path of an existing cost model JSON file")
        for name in ("target_attn", "target_mlp", "target_quant", "target_cost"):
            v = getattr(self, name)
            if v in ([], "", ()):
                setattr(self, name, [])  # the grid's cheapest level to 1 (training.episodes.default_target_ranges)
                continue
            try:
                v = [float(x) for x in (v.split(",") if isinstance(v, str) else v)]
            except (TypeError, ValueError):
                _bad(name, v, "lo,hi with 0 < lo <= hi <= 1", type_error=True)
            if len(v) != 2 or not 0 < v[0] <= v[1] <= 1:
                _bad(name, v, "lo,hi with 0 < lo <= hi <= 1")
            setattr(self, name, v)
        for name, lo in (("horizon", 1), ("group_size", 2), ("contexts_per_update", 1), ("rollout_batch", 1),
                         ("ppo_epochs", 1), ("ppo_minibatches", 1), ("policy_d_model", 1), ("policy_heads", 1),
                         ("policy_layers", 1), ("max_updates", 1), ("checkpoint_every", 1), ("max_contexts", 0),
                         ("threads", 0)):
            _int(name, getattr(self, name), lo)
        _int("seed", getattr(self, "seed"), 0, validation.MAX_SEED - 1)
        _int("context_length", self.context_length, max(validation.MIN_SEQ_LEN, self.horizon + 2),
             why=f"at least --horizon + 2 = {self.horizon + 2} and {validation.MIN_SEQ_LEN}")
        for name, lo, lo_open, hi in (("gamma", 0.0, False, 1.0), ("alpha_attn", 0.0, False, None),
                                      ("alpha_mlp", 0.0, False, None), ("alpha_quant", 0.0, False, None),
                                      ("alpha_cost", 0.0, False, None),
                                      ("temperature", 0.0, True, None),
                                      ("clip", 0.0, True, None), ("entropy_coef", 0.0, False, None), ("lr", 0.0, True, None),
                                      ("weight_decay", 0.0, False, None), ("grad_clip", 0.0, True, None),
                                      ("policy_mlp_ratio", 0.0, True, None), ("policy_anchor_sharpness", 0.0, True, 700.0),
                                      ("max_minutes", 0.0, False, None)):
            _real(name, getattr(self, name), lo, hi, lo_open)
        # a band of 1 would make every realized budget penalty-free (and the budget guard allow anything)
        validation.check_real(_flag("budget_tolerance"), self.budget_tolerance, 0.0, 1.0, hi_open=True)
        episodes = self.contexts_per_update * self.group_size
        if self.ppo_minibatches > episodes:
            _bad("ppo_minibatches", self.ppo_minibatches, f"at most the episodes of an update, --contexts-per-update x "
                 f"--group-size = {episodes} (more would take empty optimizer steps)")
        if self.policy_d_model % self.policy_heads:
            _bad("policy_heads", self.policy_heads, f"a divisor of --policy-d-model={self.policy_d_model}")
        if self.policy_budget_head not in BUDGET_HEADS:
            _bad("policy_budget_head", self.policy_budget_head, f"one of {list(BUDGET_HEADS)}")
        if self.dtype not in DTYPES:
            _bad("dtype", self.dtype, f"one of {sorted(DTYPES)}")
        resolve_device(self.device, argument="--device")
        for name in ("resume", "overwrite", "progress", "budget_guard"):
            if not isinstance(getattr(self, name), bool):
                _bad(name, getattr(self, name), "true or false", type_error=True)
        if self.resume and self.overwrite:
            _bad("overwrite", True, "not together with --resume (--resume continues the run in --out, --overwrite replaces it)")

    @property
    def alphas(self) -> list[float]:
        """Penalty weight per budget column (cost mode: column 0 is the cost)."""
        if self.budget_mode == "cost":
            return [self.alpha_cost, 0.0, 0.0]
        return [self.alpha_attn, self.alpha_mlp, self.alpha_quant]

    @property
    def target_ranges(self) -> dict[str, list[float]]:
        """The per-axis target ranges given (an axis without one samples its grid's cheapest level to 1)."""
        ranges = {"attn": self.target_attn, "mlp": self.target_mlp, "quant": self.target_quant}
        return {axis: r for axis, r in ranges.items() if r}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "GRPOConfig":
        names = {f.name for f in fields(cls)}
        d = {k.replace("-", "_"): v for k, v in d.items()}
        unknown = set(d) - names
        if unknown:
            raise ArgumentError("--config", f"unknown config keys {sorted(unknown)}; valid keys: {sorted(names)}")
        return cls(**d)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def _bad(name: str, value, valid: str, type_error: bool = False):
    cls = ArgumentTypeError if type_error else ArgumentError
    raise cls(_flag(name), f"{_flag(name)} {value!r} is invalid: {valid}")


def _int(name: str, value, lo: int, hi: int | None = None, why: str = "") -> None:
    validation.check_int(_flag(name), value, lo, hi, why)


def _real(name: str, value, lo: float, hi: float | None, lo_open: bool) -> None:
    validation.check_real(_flag(name), value, lo, hi, lo_open=lo_open)


# ---------------------------------------------------------------------------------------------------
# rewards and advantages
# ---------------------------------------------------------------------------------------------------
def discounted_returns(rewards: Tensor, gamma: float) -> Tensor:
    """G_t = r_t + gamma * G_{t+1} over the last dim ([N, T] -> [N, T])."""
    out = torch.empty_like(rewards)
    running = torch.zeros_like(rewards[..., 0])
    for t in range(rewards.shape[-1] - 1, -1, -1):
        running = rewards[..., t] + gamma * running
        out[..., t] = running
    return out


def budget_penalty(budget: Tensor, targets: Tensor, alphas: Sequence[float], tolerance: float,
                   axes: Sequence[str] | Sequence[bool] = AXES) -> Tensor:
    """[N] sum over the enabled columns of alpha * max(|budget - target| - tolerance, 0)^2. `axes`:
    the enabled axis names (per-axis budget) or one bool per column (BudgetSpec.enabled)."""
    excess = ((budget - targets).abs() - tolerance).clamp(min=0) ** 2  # [N, 3]
    enabled = list(axes) if axes and isinstance(list(axes)[0], bool) else [axis in axes for axis in AXES]
    weights = torch.tensor([a if on else 0.0 for a, on in zip(alphas, enabled)], dtype=excess.dtype)
    return (excess * weights).sum(-1)


def group_centered(values: Tensor, group: int) -> Tensor:
    """[C*K, T] -> the same minus, per context and step, the mean over its K schedules."""
    N, T = values.shape
    v = values.view(N // group, group, T)
    return (v - v.mean(dim=1, keepdim=True)).view(N, T)


def _all_sum(t: Tensor) -> Tensor:
    if dist.is_available() and dist.is_initialized():
        device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        out = t.detach().to(device).clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM)
        return out.to(t.device)
    return t


def whiten(values: Tensor, mask: Tensor, eps: float = 1e-8) -> Tensor:
    """(values - mean) / (std + eps) with mean and (population) std over the masked entries of the
    global batch (summed over ranks when torch.distributed is initialised); 0 where mask is False."""
    m = mask.to(torch.float64)
    v = values.to(torch.float64)
    stats = _all_sum(torch.stack([(v * m).sum(), (v * v * m).sum(), m.sum()]))
    n = stats[2].clamp(min=1)
    mean = stats[0] / n
    var = (stats[1] / n - mean * mean).clamp(min=0)
    return torch.where(mask, (v - mean) / (var.sqrt() + eps), torch.zeros_like(v)).to(values.dtype)


def grpo_advantages(ep: Episodes, cfg: GRPOConfig, axes: Sequence[str] | Sequence[bool]) -> dict[str, Tensor]:
    """Rewards, returns, penalties and whitened advantages of a batch of episodes."""
    rewards = ep.logp.to(torch.float64).cpu()
    returns = discounted_returns(rewards, cfg.gamma)
    penalty = budget_penalty(ep.budget, ep.targets, cfg.alphas, cfg.budget_tolerance, axes)
    total = returns - penalty[:, None]
    adv = whiten(group_centered(total, ep.group), ep.controlled.cpu())
    return {"rewards": rewards, "returns": returns, "penalty": penalty, "advantages": adv}


# ---------------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------------
def derive_seed(*parts: int) -> int:
    """A 63-bit seed from integers (stable across processes and Python versions)."""
    h = hashlib.sha256(",".join(str(int(p)) for p in parts).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


def _generator(*parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(derive_seed(*parts))


def update_contexts(n_contexts: int, seed: int, update: int, per_update: int) -> list[int]:
    """Global context indices of an update: epochs of seeded permutations of the training set."""
    out = []
    for j in range(per_update):
        g = update * per_update + j
        epoch, k = divmod(g, n_contexts)
        perm = torch.randperm(n_contexts, generator=_generator(seed, 1, epoch))
        out.append(int(perm[k]))
    return out


atomic_save = atomic_torch_save
_device = resolve_device
RUN_FILES = ("config.json", "checkpoint.pt", "policy.pt", "tb", "cost_model.json")


LOCK = ".lock"
# what a resumed run may change: how long it runs, how it checkpoints and shows progress, where and with
# how many threads / contexts per rollout call it computes. Every other option defines the run (model,
# data, targets, rewards, optimizer, policy, seed); the optimizer state and the replay depend on them.
RESUME_MAY_CHANGE = ("max_updates", "max_minutes", "checkpoint_every", "rollout_batch", "threads", "device", "progress",
                     "out", "resume", "overwrite")


def check_out_dir(cfg: GRPOConfig) -> None:
    """--out must not hold a run unless --resume continues it or --overwrite replaces it (checks
    only: nothing is written or removed here)."""
    out = Path(cfg.out)
    if os.path.lexists(out) and not out.is_dir():
        _bad("out", cfg.out, "a directory (this path is a file)")
    checkpoint = out / "checkpoint.pt"
    held = [name for name in RUN_FILES if os.path.lexists(out / name)]
    if cfg.resume:
        if checkpoint.is_file():
            return
        if held:  # a run that stopped before its first checkpoint: nothing to resume, only to start over
            raise ArgumentError("--resume", f"--resume: {cfg.out} holds a run that stopped before its first checkpoint "
                                            f"({', '.join(held)}; no {checkpoint.name}), so there is nothing to resume: "
                                            "pass --overwrite instead of --resume to start it over (its "
                                            f"{', '.join(held)} are replaced)")
        raise ArgumentError("--resume", f"--resume: no checkpoint at {checkpoint}; start a new run without --resume")
    if held and not cfg.overwrite:
        if not checkpoint.is_file():
            raise ArgumentError("--out", f"--out {cfg.out} holds a run that stopped before its first checkpoint "
                                         f"({', '.join(held)}), which --resume cannot continue: pass --overwrite to "
                                         f"start it over (its {', '.join(held)} are replaced), or a new --out")
        raise ArgumentError("--out", f"--out {cfg.out} already holds a run ({', '.join(held)}): pass --resume to continue "
                                     "it, --overwrite to replace it, or a new --out")


class RunLock:
    """OUT/.lock, locked (fcntl.flock) for a run's whole life: a second run, an --overwrite or a --resume
    into a directory a live run uses is refused. The kernel drops the lock when its process ends, so a
    crashed run's leftover file blocks nothing. The file holds the owner's pid (for the message)."""

    def __init__(self, out: Path):
        self.path, self.fd = Path(out) / LOCK, None
        self.created = False  # this run made --out (a run that fails to start removes it again)

    def acquire(self) -> "RunLock":
        import fcntl

        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                owner = os.read(fd, 32).decode(errors="replace").strip() or "?"
                os.close(fd)
                raise ArgumentError("--out", f"--out {self.path.parent} is in use by another training run (pid {owner}, "
                                             f"lock {self.path}): wait for it to end or stop it, or choose another "
                                             "--out") from None
            except OSError as e:  # a file system without flock: run unprotected, say so
                os.close(fd)
                print(f"grpo: warning: cannot lock {self.path} ({e.strerror}); nothing stops a second run from "
                      "using this --out", file=sys.stderr)
                return self
            try:  # the previous owner removes the file when it ends: hold the lock of the file that is there
                if os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
            except FileNotFoundError:
                pass
            os.close(fd)
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self.fd = fd
        return self

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # still locked: a process waiting on this inode retries
            os.close(self.fd)
            self.fd = None


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """A checkpoint training.grpo wrote (any problem: one-line ArgumentError naming --resume)."""
    try:
        state = torch.load(path, map_location=map_location, weights_only=False)
    except Exception as e:
        raise ArgumentError("--resume", f"--resume: {path} is not a readable checkpoint ({type(e).__name__}: "
                                        f"{_one_line(e)})") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        version = state.get("version") if isinstance(state, dict) else None
        raise ArgumentError("--resume", f"--resume: unsupported checkpoint version {version!r} in {path}; "
                                        f"this training.grpo writes version {CHECKPOINT_VERSION}")
    missing = [k for k in ("update", "policy", "optimizer", "rng") if k not in state]
    if missing:
        raise ArgumentError("--resume", f"--resume: {path} lacks {', '.join(missing)} (an incomplete checkpoint): "
                                        "pass --overwrite instead of --resume to start the run over")
    return state


def _one_line(e: BaseException, limit: int = 300) -> str:
    text = " ".join(str(e).split())
    return text if len(text) <= limit else text[:limit] + " ..."


def stored_config(out: Path) -> dict | None:
    """The options the run in `out` trains with: its checkpoint's (what its optimizer state belongs to),
    else its config.json's; None where neither is there."""
    checkpoint, saved = out / "checkpoint.pt", out / "config.json"
    stored = read_checkpoint(checkpoint).get("config") if checkpoint.is_file() else None
    if not isinstance(stored, dict):
        if not saved.is_file():
            return None
        stored = _read_config_file(str(saved), flag="--resume")
    return _run_options(stored)


def _run_options(stored: dict) -> dict:
    """A stored config as the options that define its run (where it is written and how it was started
    are the command line's); a run from before --budget-guard existed continues without the guard."""
    return {"budget_guard": False, **{k: v for k, v in stored.items() if k not in ("out", "resume", "overwrite")}}


def check_resume_options(stored: GRPOConfig, cfg: GRPOConfig, given=None) -> None:
    """A resumed run keeps its options: `cfg` may differ from `stored` only in RESUME_MAY_CHANGE (among
    `given`, the options asked for; None: all). Else an ArgumentError naming the option and both values."""
    for name in given if given is not None else [f.name for f in fields(GRPOConfig)]:
        old, new = getattr(stored, name), getattr(cfg, name)
        if name not in RESUME_MAY_CHANGE and _compared(stored, name) != _compared(cfg, name):
            show = lambda v: json.dumps(v) if isinstance(v, (list, dict)) else str(v)  # noqa: E731
            may = ", ".join(_flag(n) for n in RESUME_MAY_CHANGE if n not in ("out", "resume", "overwrite"))
            raise ArgumentError(_flag(name), f"--resume: {_flag(name)} {show(new)} differs from the run's stored "
                                             f"{_flag(name)} {show(old)}; a resumed run keeps the options it started "
                                             f"with (only {may} may change): drop {_flag(name)}, or start a new run "
                                             "(another --out, or --overwrite)")


def _compared(cfg: GRPOConfig, name: str):
    """What a resume compares of option `name`: its value; for --target-<axis>, the range its targets are
    drawn from (empty: the grid's cheapest level to 1, so a run from before that default, which stored the
    default grid's 0.1,1 attn and 0.4,1 mlp, resumes as it started)."""
    value = getattr(cfg, name)
    if name not in ("target_attn", "target_mlp", "target_quant") or value:
        return value
    space = ActionSpace(cfg.actions, cfg.levels or None, quant=cfg.quant)
    return list(default_target_ranges(space)[name.removeprefix("target_")])


def check_target_ranges(cfg: GRPOConfig, space: ActionSpace) -> None:
    """A new run's --target-* ranges: only those its budget samples (--target-cost for a cost budget, else
    --target-<axis> of an enabled axis; any other would be silently ignored), and per axis within what the
    grid can realize, [its cheapest level's cost, 1] (as --target-cost within the feasible cost range), since
    targets below it are penalised whatever the policy does."""
    show = lambda r: ",".join(f"{x:g}" for x in r)  # noqa: E731
    if cfg.budget_mode != "cost" and cfg.target_cost:
        _bad("target_cost", show(cfg.target_cost), f"only for --budget-mode cost (--budget-mode {cfg.budget_mode} "
             "samples a target per axis: --target-attn, --target-mlp, --target-quant); drop it or pass "
             "--budget-mode cost")
    grid = default_target_ranges(space)
    for axis, (lo, hi) in cfg.target_ranges.items():
        if [lo, hi] == list(grid[axis]):  # what it samples anyway (a config.json from before this default)
            continue
        if cfg.budget_mode == "cost":
            _bad(f"target_{axis}", show((lo, hi)), "only for --budget-mode per-axis (a cost budget samples one target, "
                 "--target-cost); drop it or pass --budget-mode per-axis")
        if axis not in space.axes:
            _bad(f"target_{axis}", show((lo, hi)), f"only for an enabled axis (--actions {','.join(space.axes)}); drop "
                 "it or enable the axis")
        if lo < grid[axis][0] - 1e-9:
            unit = "bits/16" if axis == "quant" else "keep"
            _bad(f"target_{axis}", show((lo, hi)), f"lo,hi within [{grid[axis][0]:g}, 1], from the {axis} grid's "
                 f"cheapest {unit} ({list(space.levels[axis])}) to dense: a lower target cannot be met")


def _lock_out_dir(cfg: GRPOConfig) -> RunLock:
    """Create --out and lock it for this run, before the model loads: a directory that cannot be written
    or that another run uses is refused at once; then, under the lock, check what it holds."""
    out = Path(cfg.out)
    if os.path.lexists(out) and not out.is_dir():
        _bad("out", cfg.out, "a directory (this path is a file)")
    created = not os.path.lexists(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out).acquire()
        lock.created = created
    except OSError as e:
        raise ArgumentError("--out", f"--out {cfg.out} is not writable ({e.strerror or e}): choose another --out") from None
    try:
        check_out_dir(cfg)
    except BaseException:
        lock.release()
        if created:
            os.rmdir(out)
        raise
    return lock


def _clear_run(out: Path) -> None:
    """--overwrite: remove the previous run's files (only those training.grpo writes)."""
    import shutil

    for name in RUN_FILES:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif os.path.lexists(path):
            path.unlink()


def _remove_stale_checkpoint_temporaries(out: Path) -> None:
    """Temporaries of a checkpoint write that was killed (also the older `<name>.tmp<pid>` naming)."""
    for name in ("checkpoint.pt", "policy.pt"):
        remove_stale_temporaries(out / name)
        for legacy in out.glob(f"{name}.tmp*"):
            pid = legacy.name.removeprefix(f"{name}.tmp")
            if pid.isdigit() and not pid_alive(int(pid)):
                legacy.unlink(missing_ok=True)


def corpus_contexts(model: str, corpus: str, split: str, length: int, vocab_size: int, seed: int,
                    max_contexts: int | None = None) -> Tensor:
    """[N, length] token windows of a corpus split (tokenised with `model`'s tokenizer). corpus
    'random': uniform random tokens (for tests), max_contexts (default 64) rows seeded by (seed, split)."""
    from solc.data import SPLITS

    if corpus == "random":
        g = _generator(seed, 2, SPLITS.index(split))
        return torch.randint(0, vocab_size, (max_contexts or 64, length), generator=g)
    import solc
    from solc.models import TINY_MODELS

    if model in TINY_MODELS:  # random-init test models have no tokenizer to read a corpus with
        raise ArgumentError("--corpus", f"--corpus {corpus!r} is invalid for --model {model}: a random-init test model "
                                        "has no tokenizer to read a text corpus with; use --corpus random")
    tokenizer = solc.load_tokenizer(model)
    return solc.data.get_contexts(tokenizer, corpus=corpus, split=split, length=length, max_contexts=max_contexts)


def load_training_contexts(cfg: GRPOConfig, vocab_size: int, split: str = "train") -> Tensor:
    """[N, context_length] token windows of the configured corpus."""
    return corpus_contexts(cfg.model, cfg.corpus, split, cfg.context_length, vocab_size, cfg.seed, cfg.max_contexts or None)


def build_model(cfg: GRPOConfig, device=None):
    """Load and compile the base model as the config says."""
    from solc.models import load_compiled

    device = device or _device(cfg.device)
    try:
        return load_compiled(cfg.model, dtype=resolve_dtype(cfg.dtype), device=device, actions=cfg.actions,
                             levels=cfg.levels or None, max_seq_len=cfg.context_length, quant=cfg.quant)
    except ArgumentError as e:
        if e.argument != "max_seq_len":
            raise
        raise ArgumentError("--context-length", f"--context-length {cfg.context_length} is invalid for --model "
                                                f"{cfg.model}: {e}") from None


def budget_spec(cfg: GRPOConfig, sol) -> BudgetSpec:
    """What the run's targets mean: the paper's per-axis budget, or a cost fraction priced by the
    configured cost model at the training context length."""
    if cfg.budget_mode == "per-axis":
        return BudgetSpec.per_axis()
    if cfg.cost_model == "bytes":
        model = BytesCostModel.for_model(sol)
    elif cfg.cost_model == "measured":
        model = measured_cost_model(cfg, sol)
    else:
        try:
            model = cost_model_from_dict(json.loads(Path(cfg.cost_model).read_text()))
        except (OSError, ValueError, TypeError, KeyError, SolcError) as e:
            raise ArgumentError("--cost-model", f"--cost-model {cfg.cost_model}: not a cost model JSON ({e})") from None
    return BudgetSpec.cost(model, context=cfg.context_length)


def measured_cost_model(cfg: GRPOConfig, sol):
    """--cost-model measured: the latency table of this run. A resumed run reads the one it started with
    (OUT/cost_model.json, which the run writes next to config.json, else its checkpoint); a new run times every action's decode
    step at --context-length on this device (rank 0; the other ranks receive its table, so every rank
    prices alike)."""
    from runtime.costs import calibrate_cost_model

    path = Path(cfg.out) / "cost_model.json"
    if cfg.resume and path.is_file():
        return cost_model_from_dict(json.loads(path.read_text()))
    checkpoint = Path(cfg.out) / "checkpoint.pt"
    if cfg.resume and checkpoint.is_file():  # cost_model.json was removed: the policy's config holds the table
        return cost_model_from_dict(read_checkpoint(checkpoint)["policy"]["config"]["budget"]["cost_model"])
    distributed = dist.is_available() and dist.is_initialized()
    table = [None]
    if not distributed or dist.get_rank() == 0:
        context = min(cfg.context_length, sol.max_seq_len - 1)  # a bucket needs context + 1 positions
        table[0] = calibrate_cost_model(sol, contexts=(context,), batch=1, progress=cfg.progress).to_dict()
    if distributed:
        dist.broadcast_object_list(table, src=0)
    return cost_model_from_dict(table[0])


def build_policy(cfg: GRPOConfig, sol) -> PolicyNet:
    torch.manual_seed(derive_seed(cfg.seed, 3))
    config = PolicyConfig.for_model(
        sol, d_model=cfg.policy_d_model, n_heads=cfg.policy_heads, n_layers=cfg.policy_layers, mlp_ratio=cfg.policy_mlp_ratio,
        budget_head=cfg.policy_budget_head, anchor_sharpness=cfg.policy_anchor_sharpness,
        budget=budget_spec(cfg, sol).to_dict(),
        budget_band=cfg.budget_tolerance if cfg.budget_guard and cfg.budget_mode == "cost" else None,
    )
    dtype = torch.float64 if cfg.dtype == "float64" else torch.float32
    return PolicyNet(config).to(device=sol.token_embedding.device, dtype=dtype)


def _cat_traj(parts: list[Trajectory]) -> Trajectory:
    return Trajectory(*(torch.cat(x, dim=0) for x in zip(*parts)))


def _cat_episodes(parts: list[Episodes]) -> Episodes:
    first = parts[0]
    return Episodes(
        logp=torch.cat([p.logp for p in parts]), actions=torch.cat([p.actions for p in parts]),
        controlled=torch.cat([p.controlled for p in parts]), budget=torch.cat([p.budget for p in parts]),
        targets=torch.cat([p.targets for p in parts]), tokens=torch.cat([p.tokens for p in parts]),
        group=first.group, prefill_len=first.prefill_len,
    )


# ---------------------------------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------------------------------
class Trainer:
    def __init__(self, cfg: GRPOConfig, sol=None, contexts: Tensor | None = None):
        self.cfg = cfg
        self.lock = None
        # before any rank can write (the process group rendezvous orders them)
        if int(os.environ.get("RANK", "0")) == 0:
            self.lock = _lock_out_dir(cfg)
        else:
            check_out_dir(cfg)
        try:
            self._setup(cfg, sol, contexts)
        except BaseException:
            self._release(cfg)
            raise

    def _setup(self, cfg: GRPOConfig, sol, contexts: Tensor | None) -> None:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if cfg.contexts_per_update % world:  # every rank says so, before the process group and the model
            _bad("contexts_per_update", cfg.contexts_per_update, f"a multiple of the number of ranks, {world} (the "
                 "contexts of an update are split evenly over them)")
        if not cfg.resume:  # a resumed run keeps the ranges it started with
            check_target_ranges(cfg, ActionSpace(cfg.actions, cfg.levels or None, quant=cfg.quant))
        self.distributed = world > 1
        if self.distributed and not dist.is_initialized():
            backend = "nccl" if _device(cfg.device).type == "cuda" else "gloo"
            dist.init_process_group(backend)
        self.rank = dist.get_rank() if self.distributed else 0
        self.world = dist.get_world_size() if self.distributed else 1
        if cfg.contexts_per_update % self.world:
            raise ValueError(f"contexts_per_update={cfg.contexts_per_update} does not split over {self.world} ranks")
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        device = _device(cfg.device)
        if device.type == "cuda" and self.distributed:
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        self.sol = sol if sol is not None else build_model(cfg, device)
        self.device = self.sol.token_embedding.device
        self.space: ActionSpace = self.sol.space
        vocab = self.sol.token_embedding.shape[0]
        self.contexts = contexts if contexts is not None else load_training_contexts(cfg, vocab)
        if self.contexts.shape[1] != cfg.context_length:
            raise ValueError(f"contexts have length {self.contexts.shape[1]}, config says {cfg.context_length}")
        self.policy = build_policy(cfg, self.sol)
        self.spec = self.policy.config.budget_spec
        if self.spec.is_cost:
            lo, hi = self.spec.feasible_range(self.space)
            if lo >= hi - 1e-9:  # no action is cheaper than dense: every target is 1, nothing to trade
                _bad("budget_mode", cfg.budget_mode, f"a cost budget needs an action cheaper than dense, but the cheapest "
                     f"action of --actions {','.join(self.space.axes)} costs {lo:.4f} of a dense step under --cost-model "
                     f"{cfg.cost_model} at --context-length {cfg.context_length}"
                     + (" (--quant activation reads the same weight bytes at every bit width)"
                        if self.space.axes == ("quant",) and self.space.quant == "activation" else "")
                     + ": use --budget-mode per-axis, or enable an axis that saves cost")
        if self.spec.is_cost and cfg.target_cost:
            if cfg.target_cost[0] < lo - 1e-9:
                _bad("target_cost", ",".join(f"{x:g}" for x in cfg.target_cost),
                     f"lo,hi within the feasible cost range [{lo:.4f}, {hi:g}] of --model {cfg.model} under "
                     f"--cost-model {cfg.cost_model} (the cheapest action's cost to dense)")
        self.optimizer = torch.optim.AdamW(self.policy.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.out = Path(cfg.out)
        self.update = 0
        self.wrote_checkpoint = False
        self.interrupted = False  # stopped early on SIGINT / SIGTERM, with a checkpoint (run raises TrainingStopped)
        self.saved_update = None  # the update of the checkpoint on disk (None: none yet)
        if cfg.resume:
            self._load_checkpoint()
        self.is_main = self.rank == 0
        self.writer = None

    def _release(self, cfg: GRPOConfig) -> None:
        if self.lock is not None:
            self.lock.release()
            if self.lock.created:  # a run that failed to start leaves no empty --out behind
                try:
                    os.rmdir(cfg.out)
                except OSError:
                    pass
            self.lock = None

    # -- checkpoints -------------------------------------------------------------------------------
    @property
    def checkpoint_path(self) -> Path:
        return self.out / "checkpoint.pt"

    def _load_checkpoint(self) -> None:
        path = self.checkpoint_path
        if not path.exists():
            raise ArgumentError("--resume", f"--resume: no checkpoint at {path}")
        state = read_checkpoint(path, map_location=self.device)
        if isinstance(state.get("config"), dict):  # the API's way in; the CLI merged the stored options already
            stored = {**_run_options(state["config"]), "out": self.cfg.out, "resume": True, "overwrite": False}
            check_resume_options(GRPOConfig.from_dict(stored), self.cfg)
        try:
            self.policy.load_state_dict(state["policy"]["state_dict"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.update = int(state["update"])
            rng = state["rng"]
            torch.set_rng_state(rng["torch"])
            random.setstate(rng["python"])
            if torch.cuda.is_available() and rng.get("cuda") is not None:
                torch.cuda.set_rng_state_all(rng["cuda"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:  # e.g. a size mismatch: not this run's
            raise ArgumentError("--resume", f"--resume: {path} does not fit the run its options describe "
                                            f"({type(e).__name__}: {_one_line(e)})") from None
        self.saved_update = self.update

    def save_checkpoint(self) -> None:
        if not self.is_main:
            return
        self.out.mkdir(parents=True, exist_ok=True)
        state = {
            "version": CHECKPOINT_VERSION,
            "update": self.update,
            "policy": self.policy.state(),
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "torch": torch.get_rng_state(),
                "python": random.getstate(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
            },
            "config": self.cfg.to_dict(),
        }
        try:
            atomic_save(state, self.checkpoint_path)
            self.saved_update = self.update
            atomic_save(self.policy.state(), self.out / "policy.pt")
        except (OSError, RuntimeError) as e:  # a full or read-only disk; torch.save reports it as RuntimeError
            raise CheckpointWriteError(self.update, self.saved_update, self.out, e) from e
        self.wrote_checkpoint = True

    # -- one update --------------------------------------------------------------------------------
    def local_slice(self) -> slice:
        per = self.cfg.contexts_per_update // self.world
        return slice(self.rank * per, (self.rank + 1) * per)

    def collect(self, update: int) -> tuple[Episodes, Trajectory, list[int]]:
        cfg = self.cfg
        ids = update_contexts(len(self.contexts), cfg.seed, update, cfg.contexts_per_update)
        gen = _generator(cfg.seed, 4, update)
        if self.spec.is_cost:
            targets = sample_cost_targets(self.spec, self.space, cfg.contexts_per_update, gen, cfg.target_cost or None)
        else:
            targets = sample_targets(self.space, cfg.contexts_per_update, gen, cfg.target_ranges)
        local = list(range(cfg.contexts_per_update))[self.local_slice()]
        eps, trajs = [], []
        self.policy.eval()
        for start in range(0, len(local), cfg.rollout_batch):
            chunk = local[start : start + cfg.rollout_batch]
            source = PolicySource(self.policy, temperature=cfg.temperature, record=True)
            gens = [_generator(cfg.seed, 5, update, ids[i]) for i in chunk]
            ctx = self.contexts[[ids[i] for i in chunk]]
            ep = rollout(self.sol, ctx, source, targets[chunk], group=cfg.group_size, horizon=cfg.horizon, generator=gens)
            eps.append(ep)
            trajs.append(source.trajectory())
        return _cat_episodes(eps), _cat_traj(trajs), local

    def ppo(self, traj: Trajectory, adv: Tensor, local: list[int], update: int) -> dict[str, float]:
        cfg, K = self.cfg, self.cfg.group_size
        adv = adv.to(self.device, traj.logp.dtype)
        mask = (~traj.dense).to(traj.logp.dtype)
        # global episode index of every local row
        rows = torch.tensor([c * K + k for c in local for k in range(K)])
        n_global = cfg.contexts_per_update * K
        sums = torch.zeros(6, dtype=torch.float64)  # loss, entropy, clipfrac, kl, count, grad_norm
        n_steps = 0
        self.policy.train()
        params = [p for p in self.policy.parameters()]
        for epoch in range(cfg.ppo_epochs):
            perm = torch.randperm(n_global, generator=_generator(cfg.seed, 6, update, epoch))
            for m in range(cfg.ppo_minibatches):
                chosen = perm[m :: cfg.ppo_minibatches]
                sel = torch.isin(rows, chosen).nonzero().squeeze(-1).to(self.device)
                part = Trajectory(*(x[sel] for x in traj))
                a, msk = adv[sel], mask[sel]
                count = _all_sum(msk.sum().detach().to(torch.float64).cpu()).clamp(min=1).item()
                self.optimizer.zero_grad(set_to_none=False)
                if len(sel):
                    logp, ent = sequence_log_probs(self.policy, part, cfg.temperature)
                    ratio = torch.exp(logp - part.logp)
                    surr = torch.minimum(ratio * a, ratio.clamp(1 - cfg.clip, 1 + cfg.clip) * a)
                    loss = ((-surr - cfg.entropy_coef * ent) * msk).sum() / count
                    loss.backward()
                    with torch.no_grad():
                        clipped = ((ratio - 1).abs() > cfg.clip).to(msk.dtype)
                        kl = (part.logp - logp)  # k1 estimator of KL(old || new)
                        local_stats = torch.stack([loss.detach() * count, (ent * msk).sum(), (clipped * msk).sum(), (kl * msk).sum()]).double().cpu()
                else:
                    local_stats = torch.zeros(4, dtype=torch.float64)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
                if self.distributed:
                    flat = torch.cat([p.grad.reshape(-1) for p in params])
                    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
                    offset = 0
                    for p in params:
                        p.grad.copy_(flat[offset : offset + p.numel()].view_as(p))
                        offset += p.numel()
                stats = _all_sum(local_stats)
                if not math.isfinite(float(stats[0])):
                    raise TrainingDiverged(f"non-finite PPO loss at update {update} (epoch {epoch}, minibatch {m})")
                grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip))
                if not math.isfinite(grad_norm):
                    raise TrainingDiverged(f"non-finite gradient norm at update {update} (epoch {epoch}, minibatch {m})")
                self.optimizer.step()
                sums += torch.cat([stats, torch.tensor([count, grad_norm], dtype=torch.float64)])
                n_steps += 1
        n = sums[4].clamp(min=1)
        return {
            "loss": float(sums[0] / n), "entropy": float(sums[1] / n), "clip_fraction": float(sums[2] / n),
            "approx_kl": float(sums[3] / n), "grad_norm": float(sums[5] / n_steps),
        }

    def step(self, update: int) -> dict[str, float]:
        cfg = self.cfg
        t0 = time.perf_counter()
        ep, traj, local = self.collect(update)
        t1 = time.perf_counter()
        r = grpo_advantages(ep, cfg, self.spec.enabled(self.space))
        finite = torch.tensor([float(torch.isfinite(r["rewards"]).all() and torch.isfinite(r["penalty"]).all() and torch.isfinite(r["advantages"]).all())])
        if float(_all_sum(finite)) < self.world:
            raise TrainingDiverged(f"non-finite reward at update {update} (log-likelihood or budget penalty is NaN/inf)")
        stats = self.ppo(traj, r["advantages"], local, update)
        t2 = time.perf_counter()
        # global episode statistics
        n_ep = ep.logp.shape[0]
        ctrl = ep.controlled.cpu().double()
        task = (r["rewards"] * ctrl).sum(1) / ctrl.sum(1).clamp(min=1)
        cols = self.spec.columns(self.space)
        net = ep.budget[:, cols].mean(1)
        vec = torch.cat([
            torch.tensor([n_ep, task.sum(), r["penalty"].sum(), net.sum(), ep.targets[:, cols].mean(1).sum()], dtype=torch.float64),
            ep.budget.sum(0), ep.targets.sum(0), (ep.budget - ep.targets).abs().sum(0),
        ])
        vec = _all_sum(vec)
        n = vec[0]
        out = {
            "reward/task": float(vec[1] / n),
            "reward/penalty": float(vec[2] / n),
            "reward/total": float((vec[1] - vec[2]) / n),
            "budget/net_keep": float(vec[3] / n),
            "budget/net_target": float(vec[4] / n),
            "perf/episodes_per_s": float(n) / (t2 - t0),
            "perf/rollout_s": t1 - t0,
            "perf/update_s": t2 - t1,
        }
        names = ["cost", "", ""] if self.spec.is_cost else AXES
        for i, axis in enumerate(names):
            if i in cols:
                out[f"budget/{axis}/realized"] = float(vec[5 + i] / n)
                out[f"budget/{axis}/target"] = float(vec[8 + i] / n)
                out[f"budget/{axis}/abs_error"] = float(vec[11 + i] / n)
        out.update({f"policy/{k}": v for k, v in stats.items() if k in ("entropy", "clip_fraction", "approx_kl")})
        out["loss/ppo"] = stats["loss"]
        out["optim/grad_norm"] = stats["grad_norm"]
        out["optim/lr"] = self.optimizer.param_groups[0]["lr"]
        return out

    def run(self) -> dict[str, float]:
        try:
            return self._run()
        finally:
            if self.lock is not None:
                self.lock.release()
                self.lock = None

    def _run(self) -> dict[str, float]:
        cfg = self.cfg
        if self.is_main:
            if cfg.overwrite and not cfg.resume:
                _clear_run(self.out)
            self.out.mkdir(parents=True, exist_ok=True)
            _remove_stale_checkpoint_temporaries(self.out)
            config = self.out / "config.json"
            if not cfg.resume or not config.exists():  # a resume keeps the record of how the run started
                config.write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")
            table = self.out / "cost_model.json"
            if cfg.cost_model == "measured" and not (cfg.resume and table.is_file()):  # what --resume prices with
                atomic_write_bytes(table, (json.dumps(self.spec.cost_model, indent=1) + "\n").encode())
            from torch.utils.tensorboard import SummaryWriter

            # scalars are logged at step = updates done; drop any logged after the checkpoint we resume from
            self.writer = SummaryWriter(str(self.out / "tb"), purge_step=self.update + 1)
        bar = None
        if self.is_main and cfg.progress:
            from tqdm import tqdm

            desc = f"grpo ({cfg.max_minutes:g} min limit)" if cfg.max_minutes > 0 else "grpo"
            bar = tqdm(total=cfg.max_updates, initial=self.update, desc=desc, unit="upd", dynamic_ncols=True)
        start, first = time.perf_counter(), self.update
        last: dict[str, float] = {}
        with _StopRequests(announce=self.is_main) as stop:
            try:
                while self.update < cfg.max_updates:
                    metrics = self.step(self.update)
                    self.update += 1
                    last = metrics
                    if self.is_main:
                        for k, v in metrics.items():
                            self.writer.add_scalar(k, v, self.update)
                        if bar is not None:
                            if cfg.max_minutes > 0:  # the time limit may end the run first: total = what fits in it
                                spent = time.perf_counter() - start
                                left = max(cfg.max_minutes * 60 - spent, 0.0)
                                fits = math.ceil(left / (spent / (self.update - first)))
                                bar.total = min(cfg.max_updates, self.update + fits)
                                bar.set_description(f"grpo ({left / 60:.1f} of {cfg.max_minutes:g} min left)")
                            bar.update(1)
                            bar.set_postfix(task=f"{metrics['reward/task']:.3f}", pen=f"{metrics['reward/penalty']:.3f}",
                                            net=f"{metrics['budget/net_keep']:.2f}/{metrics['budget/net_target']:.2f}",
                                            eps=f"{metrics['perf/episodes_per_s']:.1f}")
                    out_of_time = cfg.max_minutes > 0 and (time.perf_counter() - start) / 60 >= cfg.max_minutes
                    stopped = stop.requested
                    if self.distributed:  # every rank stops at the same update
                        flags = _all_sum(torch.tensor([float(out_of_time), float(stopped)]))
                        out_of_time, stopped = bool(flags[0] > 0), bool(flags[1] > 0)
                    if self.update % cfg.checkpoint_every == 0 or self.update == cfg.max_updates or out_of_time or stopped:
                        self.save_checkpoint()
                    if stopped:
                        self.interrupted = True
                        break
                    if out_of_time:
                        if self.is_main:
                            print(f"grpo: time limit of {cfg.max_minutes} min reached after {self.update} updates", file=sys.stderr)
                        break
            finally:
                if bar is not None:
                    bar.close()
                if self.writer is not None:
                    self.writer.flush()
                    self.writer.close()
        if self.interrupted:
            raise TrainingStopped(self.update, self.checkpoint_path)
        return last


class _StopRequests:
    """SIGINT (Ctrl-C) and SIGTERM within the block ask the training loop to stop after the update that is
    running, with a checkpoint (`requested`); a second one aborts at once (KeyboardInterrupt). Outside the
    main thread (no signal handlers there) nothing is installed."""

    SIGNALS = ("SIGINT", "SIGTERM")

    def __init__(self, announce: bool):
        self.requested, self.announce, self._previous = False, announce, {}

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        if self.announce:
            print("\ngrpo: stopping after this update with a checkpoint (again to abort now)", file=sys.stderr, flush=True)

    def __enter__(self) -> "_StopRequests":
        if threading.current_thread() is threading.main_thread():
            for name in self.SIGNALS:
                sig = getattr(signal, name, None)
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: GRPOConfig, sol=None, contexts: Tensor | None = None) -> Trainer:
    """Run GRPO training as configured; returns the Trainer (its .policy is the trained policy)."""
    trainer = Trainer(cfg, sol=sol, contexts=contexts)
    trainer.run()
    return trainer


# ---------------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------------
def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m training.grpo",
        description=__doc__ + "\nPrecedence: built-in defaults < --config file < command-line options.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--config", help="YAML or JSON file of options (keys as below, with _ or -)", default=argparse.SUPPRESS)
    defaults = GRPOConfig()
    for f in fields(GRPOConfig):
        flag = "--" + f.name.replace("_", "-")
        default = getattr(defaults, f.name)
        help_ = f.metadata["help"] + f" (default: {json.dumps(default) if isinstance(default, (list, dict)) else default})"
        if f.type in ("bool", bool):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif isinstance(default, list):
            p.add_argument(flag, type=str, default=argparse.SUPPRESS, metavar="A,B", help=help_)
        elif isinstance(default, dict):
            p.add_argument(flag, type=str, default=argparse.SUPPRESS, metavar="JSON", help=help_)
        else:
            p.add_argument(flag, type=type(default), default=argparse.SUPPRESS, help=help_)
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    return p


def yaml_load(text: str):
    """yaml.safe_load, but with YAML 1.2's floats: `lr: 3e-4` is the number it is on the command line and in
    JSON, not the string PyYAML's YAML 1.1 rules make of an exponent without a dot."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver("tag:yaml.org,2002:float",
                                 re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$"),
                                 list("-+0123456789."))
    return yaml.load(text, Loader=Loader)


def _read_config_file(path: str, flag: str = "--config") -> dict:
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise ArgumentError(flag, f"{flag} {path}: cannot read it ({e})") from None
    try:
        if path.endswith(".json"):
            data = json.loads(text)
        else:
            data = yaml_load(text) or {}
    except Exception as e:  # json.JSONDecodeError, yaml.YAMLError
        raise ArgumentError(flag, f"{flag} {path}: not valid {'JSON' if path.endswith('.json') else 'YAML'} ({e})") from None
    if not isinstance(data, dict):
        raise ArgumentError(flag, f"{flag} {path}: a config file must hold a mapping of option names to values")
    return data


def config_from_args(argv: Sequence[str] | None = None) -> GRPOConfig:
    if argv is not None and (isinstance(argv, str) or not all(isinstance(a, str) for a in argv)):
        raise ArgumentTypeError("argv", f"argv={argv!r} is invalid: a list of strings (command-line words)")
    args = vars(_parser().parse_args(argv))
    given = {k.replace("-", "_"): v for k, v in _read_config_file(args["config"]).items()} if "config" in args else {}
    given.update({k: v for k, v in args.items() if k != "config"})
    if not isinstance(given.get("out", ""), str):  # (a config file's `out: 5`)
        _bad("out", given["out"], "a non-empty string", type_error=True)
    out = Path(given.get("out") or GRPOConfig().out)
    stored = stored_config(out) if given.get("resume") is True else None
    if stored is None:  # a new run, or nothing to resume (the Trainer says so)
        return GRPOConfig.from_dict(given)
    # a resumed run continues with the options it was started with; only RESUME_MAY_CHANGE may change
    cfg = GRPOConfig.from_dict({**stored, **given})
    if (out / "checkpoint.pt").is_file():  # else there is nothing to resume, which the Trainer says
        check_resume_options(GRPOConfig.from_dict(stored), cfg, given)
    return cfg


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else int(os.environ.get("RANK", "0"))


def main(argv: Sequence[str] | None = None) -> int:
    cfg = None
    ctrl_c_raises()  # torch has loaded: Ctrl-C is a KeyboardInterrupt
    try:
        cfg = config_from_args(argv)
        trainer = train(cfg)
    except TrainingStopped as e:
        if _rank() == 0:  # every rank stops at the same update; rank 0 speaks for them
            print(f"grpo: {e}: the same command with --resume continues the run", file=sys.stderr)
        if dist.is_available() and dist.is_initialized():
            dist.destroy_process_group()
        return 130
    except KeyboardInterrupt:  # a second Ctrl-C (abort at once), or one during set-up
        checkpoint = Path(cfg.out) / "checkpoint.pt" if cfg is not None else None
        if checkpoint is not None and checkpoint.is_file():
            kept = f"the last checkpoint ({checkpoint}) is kept: the same command with --resume continues from it"
        elif cfg is not None and any(os.path.lexists(Path(cfg.out) / n) for n in RUN_FILES):
            kept = f"no checkpoint was written: rerun with --overwrite to start over (the run files in {cfg.out} are replaced)"
        else:
            kept = "nothing was written"
        print(f"\ngrpo: interrupted; {kept}", file=sys.stderr)
        return 130
    except CheckpointWriteError as e:
        print(f"grpo: error: {e}", file=sys.stderr)
        return 1
    except TrainingDiverged as e:
        checkpoint = Path(cfg.out) / "checkpoint.pt"
        kept = (f"The last good checkpoint ({checkpoint}) is intact." if checkpoint.is_file()
                else "No checkpoint was written (it stopped before the first one): rerun with --overwrite to start over.")
        if _rank() == 0:  # every rank stops at the same update
            print(f"grpo: training stopped: {e}. {kept}", file=sys.stderr)
        return 3
    except SolcError as e:
        print(f"grpo: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # config.json or tb/ could not be written (a full or read-only disk)
        print(f"grpo: error: cannot write to --out {cfg.out if cfg is not None else ''}: {e}", file=sys.stderr)
        return 1
    if trainer.is_main:
        if trainer.wrote_checkpoint:
            print(f"grpo: {trainer.update} updates done; policy written to {Path(cfg.out) / 'policy.pt'}")
        else:
            print(f"grpo: nothing to do: the run in {cfg.out} is already at --max-updates {cfg.max_updates}")
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
