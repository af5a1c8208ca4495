"""The SOL policy network and the ActionSource that deploys it.

    config = PolicyConfig.for_model(sol)                  # d_base and the action space from a SOLModel
    policy = PolicyNet(config)
    source = PolicySource(policy, greedy=True)            # an ActionSource (runtime/schedulers.py)
    sol.generate(ids, policy=source, budget=0.6)

Architecture (DESIGN.md "Policy and training"): a 1-layer pre-LN causal transformer (d 512, 4 heads,
MLP 4x) with its own KV cache. The input of step t is the sum of four projections:

  * the base model's last-layer hidden state of the previous token   (LayerNorm -> Linear)
  * the embedding of the token being fed at step t                    (LayerNorm -> Linear)
  * 8 scalars through a small MLP (Linear 8->64, GELU, Linear 64->d):
        progress t/T, dense-step flag, 3 per-axis targets, 3 running deviations
    (the per-axis order is attn, mlp, quant; bits are counted as bits/16; see `policy_scalars`)
  * an embedding of the previous action (index A = "no previous action", used at step 0)

No positional embedding: order comes from causal attention and the progress scalar.
Outputs per step: action logits [A] and the budget head [3] (one number per axis, attn/mlp/quant).
How the budget head enters the logits is `PolicyConfig.budget_head`:

  "anchored" (default): a per-axis quadratic prior around the cost the episode NEEDS from now on,
        need = target - deviation / (1 - t/T)      (the mean cost over the remaining steps that would
                                                   land the episode exactly on its target)
        anchor = need + budget_head(h)             (the head shifts it per token)
        logits[a] = action_head(h)[a] - sum_axis kappa_axis * (cost[a, axis] - anchor_axis)^2
    with kappa_axis = softplus(learned per-axis parameter), initially `anchor_sharpness`. An
    untrained policy is a budget controller: greedy, it picks per axis the level nearest the need
    (error diffusion, like the Fixed baseline's round-robin); sampled, it explores levels near it.
    Training learns where to deviate (action_head and the anchor shift read the hidden state).
  "price": a per-axis price, logits[a] = action_head(h)[a] + sum_axis budget_head(h)_axis * cost[a, axis];
    an untrained policy is uniform over the actions.

cost = `ActionSpace.cost_table()`; disabled axes (constant cost) do not enter. The logits are divided
by the temperature. action_head and budget_head start at zero. A cost-budget policy with
`budget_band` then masks the actions that would take its running deviation outside the band, or leave
the rest of the episode unable to bring it back (`budget_guard`); the mask needs the episode's horizon.

Running deviation on an axis after s controlled steps = sum over those steps of (cost - target) / T:
how far ahead (+) or behind (-) the episode is on that axis, in units of the whole horizon. Steps
forced dense count in no budget and leave the deviations unchanged.

The same weights run either incrementally (`cache=` a PolicyCache: one step at a time, deployment and
rollouts) or over a whole stored sequence (`cache=None`: the PPO update); both give the same log-probs
(to fp32 rounding). On the CPU in fp32 an incremental decision is one C call (runtime/ops/cpu_policy.py:
the network, the prior, the guard and the pick); elsewhere it runs op by op below.

This module needs only torch and runtime/: export and the runtime import it without training/.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from dataclasses import asdict, dataclass, field, fields
from typing import Any, NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from runtime.actions import AXES, ActionSpace
from runtime.budget import BudgetSpec
from runtime.errors import ArgumentError, AssetError
from runtime.files import atomic_torch_save
from runtime.ops import cpu_linear, cpu_policy
from runtime.schedulers import ActionSource, uniforms
from runtime.validation import check_real, fail

POLICY_VERSION = 1
N_SCALARS = 8  # progress, dense flag, 3 targets, 3 running deviations
BUDGET_HEADS = ("anchored", "price")


@dataclass
class PolicyConfig:
    """Hyper-parameters of the policy network. JSON round trip with a checked `version`."""

    d_base: int  # hidden size of the base model (its hidden states and token embeddings)
    space: dict  # ActionSpace.to_dict() of the action space the policy picks from
    d_model: int = 512
    n_heads: int = 4
    n_layers: int = 1
    mlp_ratio: float = 4.0
    scalar_hidden: int = 64
    temperature: float = 1.0  # default divisor of the logits (rollouts pass their own)
    budget_head: str = "anchored"  # "anchored" | "price" (see the module docstring)
    anchor_sharpness: float = 20.0  # initial kappa of the anchored prior (nats per squared cost unit)
    budget: dict | None = None  # runtime.budget.BudgetSpec dict: what a target means (None: per-axis)
    budget_band: float | None = None  # cost budgets: the guard's band (see `budget_guard`); None = no guard
    version: int = POLICY_VERSION

    def __post_init__(self):
        if self.version != POLICY_VERSION:
            raise ValueError(f"unsupported PolicyConfig version {self.version!r}; supported versions: [{POLICY_VERSION}]")
        if self.d_base < 1 or self.d_model < 1 or self.n_layers < 1 or self.scalar_hidden < 1:
            raise ValueError(f"PolicyConfig sizes must be >= 1, got {self}")
        if self.d_model % self.n_heads != 0:
            raise ValueError(f"d_model={self.d_model} is not a multiple of n_heads={self.n_heads}")
        if not self.temperature > 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if self.budget_head not in BUDGET_HEADS:
            raise ValueError(f"budget_head={self.budget_head!r}; valid choices: {list(BUDGET_HEADS)}")
        if not self.anchor_sharpness > 0:
            raise ValueError(f"anchor_sharpness must be > 0, got {self.anchor_sharpness}")
        if isinstance(self.space, ActionSpace):
            self.space = self.space.to_dict()
        ActionSpace.from_dict(self.space)  # validates
        if isinstance(self.budget, BudgetSpec):
            self.budget = self.budget.to_dict()
        BudgetSpec.from_dict(self.budget)  # validates
        if self.budget_band is not None:
            if not BudgetSpec.from_dict(self.budget).is_cost:
                raise ValueError("budget_band (the budget guard) needs a cost budget, got a per-axis budget")
            if isinstance(self.budget_band, bool) or not (isinstance(self.budget_band, (int, float)) and 0 <= self.budget_band < 1):
                raise ValueError(f"budget_band must be a number in [0, 1) or None, got {self.budget_band!r}")

    @property
    def budget_spec(self) -> BudgetSpec:
        return BudgetSpec.from_dict(self.budget)

    @property
    def action_space(self) -> ActionSpace:
        return ActionSpace.from_dict(self.space)

    @property
    def n_actions(self) -> int:
        return len(self.action_space)

    @classmethod
    def for_model(cls, sol, **overrides) -> "PolicyConfig":
        """A config for a compiled SOLModel: its hidden size and action space."""
        return cls(d_base=int(sol.token_embedding.shape[1]), space=sol.space.to_dict(), **overrides)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PolicyConfig":
        if not isinstance(d, dict):
            raise ValueError(f"a PolicyConfig dict must be a dict, got {d!r}")
        if d.get("version") != POLICY_VERSION:
            raise ValueError(f"unsupported PolicyConfig version {d.get('version')!r}; supported versions: [{POLICY_VERSION}]")
        names = {f.name for f in fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown PolicyConfig fields {sorted(unknown)}; valid fields: {sorted(names)}")
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> "PolicyConfig":
        return cls.from_dict(json.loads(s))


class PolicyOutput(NamedTuple):
    logits: Tensor  # [B, T, A], already divided by the temperature
    budget: Tensor  # [B, T, 3] budget head (per-axis price added to the logits through the cost table)


class PolicyCache:
    """Static per-layer key/value cache of the policy transformer for incremental stepping.

    The next write position is a device tensor and every step attends over the whole cache (keys past
    the position masked), so a step has the same shapes at every position (capturable); `length` is
    its host copy, for the bounds check."""

    def __init__(self, config: PolicyConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        if batch < 1 or max_len < 1:
            raise ValueError(f"PolicyCache needs batch >= 1 and max_len >= 1, got batch={batch}, max_len={max_len}")
        head_dim = config.d_model // config.n_heads
        shape = (batch, config.n_heads, max_len, head_dim)
        self.batch, self.max_len, self.length = batch, max_len, 0
        self.position = torch.zeros((), dtype=torch.long, device=device)
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]

    def check_room(self, steps: int) -> None:
        """Raise unless `steps` more steps fit."""
        if self.length + steps > self.max_len:
            raise ValueError(f"policy cache holds {self.max_len} steps; step {self.length + steps} does not fit")

    def advance(self, steps: int) -> None:
        self.length += steps
        self.position.add_(steps)


def _run(module: nn.Module, x: Tensor) -> Tensor:
    """module(x), with its linears on `cpu_linear` in a deployed CPU decision run op by op (fp32, no
    autograd, one step, where runtime/ops/cpu_policy.py's C call does not apply): MKL runs a one-row
    linear at ~10 GB/s of weights on this CPU, about half of what cpu_linear's GEMV streams, and a decision's ten linears (15 MB) were most of its 2-3 ms, a sixth of a SmolLM2
    decode step. cpu_linear also sums each row on its own, so a row's action does not depend on its
    batch mates. Training's full-sequence forward (autograd, T > 1) keeps nn.Linear: both sum the same
    terms in different orders (test_incremental_equals_full_sequence bounds the difference)."""
    if isinstance(module, nn.Sequential):
        for m in module:
            x = _run(m, x)
        return x
    # cpu_linear has no autograd; off CPU or fp32 it runs F.linear itself, as nn.Linear would
    if isinstance(module, nn.Linear) and x.dim() == 3 and x.shape[1] == 1 and not torch.is_grad_enabled():
        return cpu_linear.linear_cpu(x, module.weight, module.bias)
    return module(x)


class _Block(nn.Module):
    def __init__(self, d: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.norm2 = nn.LayerNorm(d)
        hidden = int(round(d * mlp_ratio))
        self.mlp = nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Linear(hidden, d))

    def forward(self, x: Tensor, cache: PolicyCache | None, layer: int) -> Tensor:
        B, T, d = x.shape
        q, k, v = _run(self.qkv, self.norm1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        if cache is None:
            scores = q @ k.transpose(-1, -2)
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()
        else:
            slots = cache.position + torch.arange(T, device=x.device)  # [T] positions of the new steps
            cache.keys[layer].index_copy_(2, slots, k.to(cache.keys[layer].dtype))
            cache.values[layer].index_copy_(2, slots, v.to(cache.values[layer].dtype))
            k, v = cache.keys[layer], cache.values[layer]
            scores = q @ k.transpose(-1, -2)
            mask = torch.arange(cache.max_len, device=x.device)[None, :] <= slots[:, None]  # [T, max_len]
        # Explicit softmax attention (not SDPA): the same math for the full sequence and one step.
        scores = (scores / math.sqrt(q.shape[-1])).masked_fill(~mask, float("-inf"))
        attn = torch.softmax(scores, dim=-1) @ v
        x = x + _run(self.proj, attn.transpose(1, 2).reshape(B, T, d))
        return x + _run(self.mlp, self.norm2(x))


class PolicyNet(nn.Module):
    """The policy network (see the module docstring)."""

    def __init__(self, config: PolicyConfig):
        super().__init__()
        self.config = config
        space = config.action_space
        self.space = space
        d, A = config.d_model, len(space)
        self.hidden_in = nn.Sequential(nn.LayerNorm(config.d_base), nn.Linear(config.d_base, d))
        self.token_in = nn.Sequential(nn.LayerNorm(config.d_base), nn.Linear(config.d_base, d))
        self.scalar_in = nn.Sequential(nn.Linear(N_SCALARS, config.scalar_hidden), nn.GELU(), nn.Linear(config.scalar_hidden, d))
        self.action_in = nn.Embedding(A + 1, d)  # index A: no previous action
        self.blocks = nn.ModuleList(_Block(d, config.n_heads, config.mlp_ratio) for _ in range(config.n_layers))
        self.norm = nn.LayerNorm(d)
        self.action_head = nn.Linear(d, A)
        self.budget_head = nn.Linear(d, 3)
        for head in (self.action_head, self.budget_head):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)
        table = config.budget_spec.table(space)  # [A, 3]: per-axis costs, or the relative cost in column 0
        self.register_buffer("cost_table", table.to(torch.float32), persistent=False)
        self.cost_table64 = table  # float64 on the host (not a buffer: .to(dtype) must not round it)
        self._costs64_on: dict[torch.device, Tensor] = {}  # the guard's column of it, per device (one copy, not one a step)
        enabled = torch.tensor(config.budget_spec.enabled(space))
        self.register_buffer("enabled_axes", enabled, persistent=False)
        lo = table.min(0).values.float()
        hi = table.max(0).values.float()
        self.register_buffer("cost_lo", lo, persistent=False)
        self.register_buffer("cost_hi", hi, persistent=False)
        # kappa = softplus(raw): start at anchor_sharpness
        raw = math.log(math.expm1(config.anchor_sharpness))
        self.sharpness = nn.Parameter(torch.full((3,), raw))

    @property
    def n_actions(self) -> int:
        return len(self.space)

    @property
    def start_action(self) -> int:
        """The previous-action index fed at the first step."""
        return len(self.space)

    def new_cache(self, batch: int, max_len: int, device=None) -> PolicyCache:
        p = next(self.parameters())
        return PolicyCache(self.config, batch, max_len, p.dtype, device or p.device)

    def forward(
        self,
        hidden: Tensor,
        token_embedding: Tensor,
        scalars: Tensor,
        prev_action: Tensor,
        cache: PolicyCache | None = None,
        temperature: float | None = None,
        horizon: int | None = None,
    ) -> PolicyOutput:
        """hidden, token_embedding [B, T, d_base]; scalars [B, T, 8]; prev_action [B, T] long.

        cache=None: the T steps are a whole episode from its first step (causal). With a cache: the T
        steps continue the cached ones (usually T = 1), and the cache advances by T. `horizon` (the
        episode's number of steps) is required by a policy with a budget guard (`config.budget_band`).
        """
        dtype = next(self.parameters()).dtype
        steps = prev_action.shape[1]
        if cache is not None:
            cache.check_room(steps)
        # a deployed CPU decision: the whole network in one C call (runtime/ops/cpu_policy.py)
        heads = cpu_policy.step(self, hidden, token_embedding, scalars, prev_action, cache) if cache is not None else None
        if heads is None:
            x = (
                _run(self.hidden_in, hidden.to(dtype))
                + _run(self.token_in, token_embedding.to(dtype))
                + _run(self.scalar_in, scalars.to(dtype))
                + self.action_in(prev_action)
            )
            for layer, block in enumerate(self.blocks):
                x = block(x, cache, layer)
            h = self.norm(x)
            heads = _run(self.action_head, h), _run(self.budget_head, h)
        if cache is not None:
            cache.advance(steps)
        raw, budget = heads
        costs = self.cost_table.to(dtype)  # [A, 3]
        if self.config.budget_head == "price":
            logits = raw + budget @ costs.T
        else:
            anchor = budget_anchor(scalars.to(dtype), self.cost_lo.to(dtype), self.cost_hi.to(dtype)) + budget
            kappa = F.softplus(self.sharpness) * self.enabled_axes.to(dtype)  # [3]
            sq = (costs[None, None] - anchor[..., None, :]) ** 2  # [B, T, A, 3]
            logits = raw - (sq * kappa).sum(-1)
        temperature = self.config.temperature if temperature is None else temperature
        logits = logits / temperature
        if self.config.budget_band is not None:
            if horizon is None:
                raise ValueError("this policy has a budget guard (budget_band): pass the episode's horizon")
            allowed = budget_guard(scalars, self._guard_costs(scalars.device), horizon, self.config.budget_band)
            logits = logits.masked_fill(~allowed, GUARDED_LOGIT)
        return PolicyOutput(logits, budget)

    def _guard_costs(self, device: torch.device) -> Tensor:
        if device not in self._costs64_on:
            self._costs64_on[device] = self.cost_table64[:, 0].to(device)
        return self._costs64_on[device]

    # -- persistence -------------------------------------------------------------------------------
    def state(self) -> dict:
        """What a checkpoint / artifact stores: the config dict and the weights."""
        return {"config": self.config.to_dict(), "state_dict": self.state_dict()}

    @classmethod
    def from_state(cls, state: dict, map_location=None) -> "PolicyNet":
        policy = cls(PolicyConfig.from_dict(state["config"]))
        policy.load_state_dict({k: v.to(map_location) if map_location else v for k, v in state["state_dict"].items()})
        return policy

    def save(self, path) -> None:
        """Write `state()` to `path` atomically: a temporary file in the same folder, then a rename, so an
        existing file is either left as it was (the write failed) or replaced whole."""
        path = Path(path)
        if not path.parent.is_dir():
            raise FileNotFoundError(f"cannot save the policy to {path}: the folder {path.parent} does not exist")
        atomic_torch_save(self.state(), path)

    @classmethod
    def load(cls, path, map_location="cpu") -> "PolicyNet":
        """The PolicyNet that `save` wrote to `path` (a policy.pt). A file that is not one (truncated,
        another format, a training checkpoint, a newer version) raises PolicyFileError naming it."""
        if isinstance(path, (str, os.PathLike)):
            path = Path(path)
            if not path.exists():
                raise FileNotFoundError(f"policy file {path} does not exist")
        if isinstance(path, Path) and path.is_dir():
            raise IsADirectoryError(f"policy file {path} is a folder, not a policy.pt")
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:
            raise PolicyFileError(f"{path} is not a readable policy file (truncated, corrupt or not written by "
                                  f"PolicyNet.save): {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
        if isinstance(state, dict) and isinstance(state.get("policy"), dict) and "config" in state["policy"]:
            beside = f" ({path.parent / 'policy.pt'})" if isinstance(path, Path) else ""
            raise PolicyFileError(f"{path} is a training checkpoint, not a policy file: load the policy.pt written "
                                  f"next to it{beside}")
        if not (isinstance(state, dict) and isinstance(state.get("config"), dict) and isinstance(state.get("state_dict"), dict)):
            if isinstance(state, dict):
                names = sorted(map(str, state))
                keys = f"keys {names[:8]}" + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            else:
                keys = f"a {type(state).__name__}"
            raise PolicyFileError(f"{path} is not a policy file: expected a dict with 'config' and 'state_dict' "
                                  f"(PolicyNet.save), got {keys}")
        version = state["config"].get("version")
        if version != POLICY_VERSION:
            raise PolicyFileError(f"{path}: policy file version {version!r} is not supported by this solc "
                                  f"(supported versions: [{POLICY_VERSION}])")
        try:
            return cls.from_state(state, map_location=None)
        except (ValueError, TypeError, RuntimeError, KeyError) as e:
            raise PolicyFileError(f"{path}: the policy file does not hold a valid policy: {e}") from e


def check_fits(policy: "PolicyNet", d_model: int | None = None, space: ActionSpace | None = None) -> None:
    """ArgumentError("policy") unless `policy` was trained for a base model of hidden size `d_model` and
    for the action grid `space` (each checked when given)."""
    d_base = policy.config.d_base
    if d_model is not None and d_model != d_base:
        raise ArgumentError("policy", f"the policy was trained for a base model of hidden size {d_base}, not "
                                      f"{d_model}: it belongs to another model")
    if space is not None and space != policy.space:
        raise ArgumentError("policy", f"the policy was trained for {policy.space}, not {space}: compile the model "
                                      "with the policy's action grid")


class PolicyFileError(AssetError, ValueError):
    """A policy file that cannot be loaded (corrupt, another format, an unsupported version); names it.
    A ValueError too, as the version check raised before."""


def budget_anchor(scalars: Tensor, lo: Tensor, hi: Tensor) -> Tensor:
    """[..., 3] per-axis mean cost the remaining steps need to land on the target:
    target - deviation / (1 - t/T), clamped to the axis' cost range [lo, hi]."""
    progress = scalars[..., 0:1]
    targets, deviations = scalars[..., 2:5], scalars[..., 5:8]
    need = targets - deviations / (1 - progress).clamp(min=1e-3)
    return torch.minimum(torch.maximum(need, lo), hi)


GUARDED_LOGIT = -1e9  # finite (not -inf): exp() is exactly 0 and the entropy's 0 * log 0 stays 0


def budget_guard(scalars: Tensor, costs: Tensor, horizon: int, band: float) -> Tensor:
    """[..., A] bool: the actions that keep the episode within `band` of its cost target.

    scalars [..., 8] (`policy_scalars`: progress s/T, the cost target in column 2, the running cost
    deviation in column 5); costs [A] the relative cost of each action. Taking action a at step s moves
    the deviation (what the episode has spent beyond its target, in units of the whole horizon) to
    d' = d + (c_a - target) / T. `a` is allowed iff |d'| <= band (the episode tracks its target at
    every step, so a greedy policy cannot put off its cheap steps to the end and then be forced into
    the cheapest action) and the rest of the horizon can still bring d' into [-band, band] (its range
    treated as continuous, between the cheapest and the dearest action). If no action is, the ones with
    the smallest miss are. Training and deployment apply the same mask (it is a function of the stored
    scalars and the horizon).
    """
    costs = costs.to(torch.float64)
    s = scalars.to(torch.float64)
    progress, target, dev = s[..., 0:1], s[..., 2:3], s[..., 5:6]
    after = dev + (costs - target) / horizon  # [..., A]
    left = (1 - progress - 1 / horizon).clamp(min=0)
    lo_end = after + left * (costs.min() - target)
    hi_end = after + left * (costs.max() - target)
    miss = (after.abs() - band).clamp(min=0) + (lo_end - band).clamp(min=0) + (-band - hi_end).clamp(min=0)
    return miss <= miss.min(-1, keepdim=True).values + 1e-12


def policy_scalars(progress: Tensor, dense: Tensor, targets: Tensor, deviations: Tensor) -> Tensor:
    """The 8 scalar inputs [B, 8]: progress t/T [B], dense flag [B], targets [B, 3], deviations [B, 3]."""
    return torch.cat([progress[:, None].double(), dense[:, None].double(), targets.double(), deviations.double()], dim=1)


class Trajectory(NamedTuple):
    """Everything a PolicySource fed its network and picked, stacked over steps ([B, T, ...])."""

    hidden: Tensor  # [B, T, d_base]
    token_embedding: Tensor  # [B, T, d_base]
    scalars: Tensor  # [B, T, 8]
    prev_action: Tensor  # [B, T]
    actions: Tensor  # [B, T]
    logp: Tensor  # [B, T] log-prob of the chosen action under the tempered policy (0 on dense steps)
    dense: Tensor  # [B, T] bool


class PolicySource(ActionSource):
    """A PolicyNet as an ActionSource: greedy (argmax) or sampled at `temperature`.

    Sampling is by inverse CDF with one uniform number per row and step, drawn from `generator` on the
    CPU; `generator` may also be a sequence of G generators, each serving B/G consecutive rows (so a
    group of rows samples the same way whatever else shares the batch: data-parallel shards agree
    with a single process). Running deviations follow the actions actually returned; dense steps
    count in no budget. With record=True, `trajectory()` returns what a PPO update needs.
    """

    def __init__(self, policy: PolicyNet, greedy: bool = False, temperature: float | None = None, record: bool = False):
        if not isinstance(policy, PolicyNet):
            hint = " (load a file with PolicyNet.load(path))" if isinstance(policy, (str, os.PathLike)) else ""
            fail("policy", policy, f"a runtime.policy.PolicyNet{hint}", type_error=True)
        for name, value in (("greedy", greedy), ("record", record)):
            if not isinstance(value, bool):
                fail(name, value, "True or False", type_error=True)
        self.policy, self.greedy, self.record = policy, greedy, record
        if temperature is not None:
            temperature = check_real("temperature", temperature, lo=0.0, lo_open=True)
        self.temperature = policy.config.temperature if temperature is None else temperature

    @property
    def budget_spec(self) -> BudgetSpec:
        """What this policy's targets mean (a cost fraction or per-axis keeps): callers price with it."""
        return self.policy.config.budget_spec

    def reset(self, space: ActionSpace, batch: int, targets: Tensor, horizon: int, generator=None) -> None:
        check_fits(self.policy, space=space)
        targets = torch.as_tensor(targets, dtype=torch.float64).expand(batch, 3)
        super().reset(space, batch, targets, horizon, generator)
        self.device = next(self.policy.parameters()).device
        self.cache = self.policy.new_cache(batch, horizon)
        self.costs = self.policy.cost_table64.to(self.device)
        self._targets = targets.to(self.device)
        self.deviations = torch.zeros(batch, 3, dtype=torch.float64, device=self.device)
        self.prev = torch.full((batch,), self.policy.start_action, dtype=torch.long, device=self.device)
        self._steps: list[tuple] = []

    @torch.no_grad()
    def next_actions(self, step: int, hidden: Tensor, token_embedding: Tensor, dense: Tensor) -> Tensor:
        for width in (hidden.shape[-1], token_embedding.shape[-1]):
            check_fits(self.policy, d_model=width)
        dev = self.device
        dense = dense.to(dev).bool()
        # a CPU decision in one C call (runtime/ops/cpu_policy.py): the network, the prior and guard and the
        # pick below, ~0.6 ms less per decision after a SmolLM2 decode step
        u = None if self.greedy else uniforms(self.generator, self.batch)  # drawn once, whichever path runs
        fast = cpu_policy.decide(self.policy, self.cache, step, self.horizon, hidden, token_embedding, dense,
                                 self._targets, self.deviations, self.prev, u, self.temperature)
        if fast is not None:
            actions, logp, scalars, self.deviations = fast
            if self.record:
                self._steps.append((hidden.to(dev), token_embedding.to(dev), scalars, self.prev, actions, logp, dense))
            self.prev = actions
            return actions
        progress = torch.full((self.batch,), step / self.horizon, dtype=torch.float64, device=dev)
        scalars = policy_scalars(progress, dense, self._targets, self.deviations)
        hidden, token_embedding = hidden.to(dev), token_embedding.to(dev)
        out = self.policy(hidden[:, None], token_embedding[:, None], scalars[:, None], self.prev[:, None], cache=self.cache,
                          temperature=self.temperature, horizon=self.horizon)
        logp_all = torch.log_softmax(out.logits[:, 0].double(), dim=-1)
        if self.greedy:
            picked = logp_all.argmax(-1)
        else:
            u = u.to(dev)
            cdf = logp_all.exp().cumsum(-1)
            picked = torch.searchsorted(cdf, (u * cdf[:, -1])[:, None]).squeeze(-1).clamp(max=self.policy.n_actions - 1)
        actions = torch.where(dense, torch.full_like(picked, self.space.dense_index), picked)
        logp = torch.where(dense, torch.zeros_like(logp_all[:, 0]), logp_all.gather(-1, actions[:, None]).squeeze(-1))
        step_dev = (self.costs[actions] - self._targets) / self.horizon
        self.deviations = self.deviations + torch.where(dense[:, None], torch.zeros_like(step_dev), step_dev)
        if self.record:
            self._steps.append((hidden, token_embedding, scalars, self.prev, actions, logp, dense))
        self.prev = actions
        return actions

    def trajectory(self) -> Trajectory:
        if not self.record:
            raise RuntimeError("PolicySource(record=True) is needed to read back a trajectory")
        return Trajectory(*(torch.stack(parts, dim=1) for parts in zip(*self._steps)))


def sequence_log_probs(policy: PolicyNet, traj: Trajectory, temperature: float) -> tuple[Tensor, Tensor]:
    """Full-sequence forward over a stored trajectory: (log-prob of the taken actions [B, T],
    entropy of the tempered distribution [B, T]), with gradients."""
    out = policy(traj.hidden, traj.token_embedding, traj.scalars, traj.prev_action, temperature=temperature,
                 horizon=traj.actions.shape[1])
    logp_all = torch.log_softmax(out.logits.double(), dim=-1)  # as PolicySource computes it
    logp = logp_all.gather(-1, traj.actions[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return logp, entropy
