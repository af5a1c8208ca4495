"""A deployed policy decision in one C call (cpu_policy.c): the policy network's incremental step on the CPU.

    raw, budget = cpu_policy.step(policy, hidden, token_embedding, scalars, prev_action, cache)  # or None

Where it applies (fp32 weights on the CPU, no autograd, one step with a PolicyCache, the C library built,
the CPU fast paths on) it returns the raw action head [B, 1, A] and the budget head [B, 1, 3]; the caller
(PolicyNet.forward) adds the budget prior, the temperature and the guard as on the op-by-op path, and
advances the cache. Elsewhere it returns None and the caller runs the modules.

The arguments of the C call are planned once per PolicyCache (a new cache per episode): the weights'
pointers, the cache's and a scratch. A plan made for one batch and cache is used by that cache only.
Packed GEMV copies of the weights are refreshed when the plan is made (cpu_linear.ensure_packed), so a
policy trained in place between episodes is read as it is now; a weight changed during an episode is not.
"""
from __future__ import annotations

import contextlib
import ctypes
from typing import Optional

import torch
from torch import Tensor, nn

from runtime.ops import cpu_linear, library

_F32 = torch.float32
_P, _L, _D = ctypes.c_void_p, ctypes.c_long, ctypes.c_double

_LAYER_WEIGHTS = ("ln1_w", "ln1_b", "qkv_w", "qkv_b", "proj_w", "proj_b", "ln2_w", "ln2_b", "fc1_w", "fc1_b",
                  "fc2_w", "fc2_b")
_NET_WEIGHTS = ("hin_ln_w", "hin_ln_b", "hin_w", "hin_b", "tin_ln_w", "tin_ln_b", "tin_w", "tin_b", "sc1_w", "sc1_b",
                "sc2_w", "sc2_b", "action_emb", "norm_w", "norm_b", "act_w", "act_b", "bud_w", "bud_b")


class PolicyLayer(ctypes.Structure):
    """cpu_policy.c's `solc_policy_layer`."""
    _fields_ = [*((n, _P) for n in _LAYER_WEIGHTS), ("k_cache", _P), ("v_cache", _P)]


class PolicyNetDesc(ctypes.Structure):
    """cpu_policy.c's `solc_policy_net`."""
    _fields_ = [*((n, _L) for n in ("B", "d_base", "d", "heads", "ff", "scalar_hidden", "n_scalars", "n_actions",
                                    "n_layers", "max_len")),
                *((n, _D) for n in ("eps_in", "eps_block", "eps_out")),
                *((n, _P) for n in _NET_WEIGHTS), ("layers", _P), ("scratch", _P)]


class PolicyPrior(ctypes.Structure):
    """cpu_policy.c's `solc_policy_prior`."""
    _fields_ = [*((n, _L) for n in ("anchored", "guarded", "n_actions")),
                *((n, _P) for n in ("costs", "lo", "hi", "kappa", "guard_costs", "costs64")), ("band", _D),
                *((n, _P) for n in ("logits", "budget", "s32"))]


class _Plan:
    """One cache's C arguments: the network's weights and the cache as descriptors, a scratch, and the
    decision's constants. `ok` is False where a tensor is not what the C reads (fp32, CPU, contiguous)."""

    def __init__(self, policy: nn.Module, cache, lib):
        self.policy, self.lib = policy, lib
        blocks = list(policy.blocks)
        ln, lin = policy.hidden_in  # (LayerNorm, Linear)
        tln, tlin = policy.token_in
        sc1, _, sc2 = policy.scalar_in
        d, d_base = lin.out_features, lin.in_features
        ff = blocks[0].mlp[0].out_features
        B = cache.batch
        weights = {"hin_ln_w": ln.weight, "hin_ln_b": ln.bias, "hin_w": lin.weight, "hin_b": lin.bias,
                   "tin_ln_w": tln.weight, "tin_ln_b": tln.bias, "tin_w": tlin.weight, "tin_b": tlin.bias,
                   "sc1_w": sc1.weight, "sc1_b": sc1.bias, "sc2_w": sc2.weight, "sc2_b": sc2.bias,
                   "action_emb": policy.action_in.weight, "norm_w": policy.norm.weight, "norm_b": policy.norm.bias,
                   "act_w": policy.action_head.weight, "act_b": policy.action_head.bias,
                   "bud_w": policy.budget_head.weight, "bud_b": policy.budget_head.bias}
        layer_weights = [{"ln1_w": b.norm1.weight, "ln1_b": b.norm1.bias, "qkv_w": b.qkv.weight, "qkv_b": b.qkv.bias,
                          "proj_w": b.proj.weight, "proj_b": b.proj.bias, "ln2_w": b.norm2.weight,
                          "ln2_b": b.norm2.bias, "fc1_w": b.mlp[0].weight, "fc1_b": b.mlp[0].bias,
                          "fc2_w": b.mlp[2].weight, "fc2_b": b.mlp[2].bias} for b in blocks]
        self.tensors = [*weights.values(), *(t for lw in layer_weights for t in lw.values()), *cache.keys, *cache.values]
        self.ok = all(t is not None and t.dtype is _F32 and t.device.type == "cpu" and t.is_contiguous()
                      for t in self.tensors)
        if not self.ok:
            return
        if B == 1:  # the one-row GEMVs read packed copies: made or refreshed now
            for t in self.tensors:
                if t.dim() == 2 and t is not policy.action_in.weight:
                    cpu_linear.ensure_packed(t)
        self.layers = (PolicyLayer * len(blocks))()
        for desc, lw, k, v in zip(self.layers, layer_weights, cache.keys, cache.values):
            for name, t in lw.items():
                setattr(desc, name, t.data_ptr())
            desc.k_cache, desc.v_cache = k.data_ptr(), v.data_ptr()
        scalar_hidden = sc1.out_features
        self.scratch = torch.empty(lib.solc_policy_scratch(B, d_base, d, ff, scalar_hidden, cache.max_len), dtype=_F32)
        net = self.net = PolicyNetDesc(B=B, d_base=d_base, d=d, heads=blocks[0].heads, ff=ff, scalar_hidden=scalar_hidden,
                                       n_scalars=sc1.in_features, n_actions=policy.action_head.out_features,
                                       n_layers=len(blocks), max_len=cache.max_len, eps_in=ln.eps,
                                       eps_block=blocks[0].norm1.eps, eps_out=policy.norm.eps)
        for name, t in weights.items():
            setattr(net, name, t.data_ptr())
        net.layers = ctypes.addressof(self.layers)
        net.scratch = self.scratch.data_ptr()
        self.net_ref = ctypes.byref(net)
        self.d_base, self.n_scalars = d_base, sc1.in_features
        self.n_actions = A = policy.action_head.out_features
        # the decision's constants (PolicyNet.forward computes them per call from the same tensors)
        config = policy.config
        self.consts = [policy.cost_table.to(_F32).contiguous(), policy.cost_lo.to(_F32).contiguous(),
                       policy.cost_hi.to(_F32).contiguous(),
                       (torch.nn.functional.softplus(policy.sharpness) * policy.enabled_axes.to(_F32)).detach().contiguous(),
                       policy._guard_costs(torch.device("cpu")).contiguous(),
                       policy.cost_table64.to(torch.float64).contiguous(),
                       torch.empty(B, A, dtype=_F32), torch.empty(B, 3, dtype=_F32), torch.empty(B, 8, dtype=_F32)]
        self.prior = PolicyPrior(anchored=int(config.budget_head == "anchored"), guarded=int(config.budget_band is not None),
                                 n_actions=A, band=config.budget_band or 0.0,
                                 **{n: t.data_ptr() for n, t in zip(("costs", "lo", "hi", "kappa", "guard_costs", "costs64",
                                                                      "logits", "budget", "s32"), self.consts)})
        self.prior_ref = ctypes.byref(self.prior)
        self.dense_index = policy.space.dense_index


def _supported(policy: nn.Module) -> bool:
    """The architecture the C step computes: exact GELUs, affine layer norms with one eps per place."""
    blocks = list(policy.blocks)
    gelus = [policy.scalar_in[1]] + [b.mlp[1] for b in blocks]
    norms = [b.norm1 for b in blocks] + [b.norm2 for b in blocks]
    return (bool(blocks) and all(isinstance(g, nn.GELU) and g.approximate == "none" for g in gelus)
            and policy.hidden_in[0].eps == policy.token_in[0].eps
            and len({n.eps for n in norms}) == 1 and all(n.weight is not None for n in norms)
            and len({(b.heads, b.mlp[0].out_features) for b in blocks}) == 1)


_switched_off = 0  # > 0 inside op_by_op()


@contextlib.contextmanager
def op_by_op():
    """Within the block decisions run op by op in torch (for side-by-side measurements and tests)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def _plan_for(policy: nn.Module, cache, B: int, hidden: Tensor) -> Optional[_Plan]:
    """The cache's plan where the C step applies to this call, else None."""
    if _switched_off:
        return None
    lib = cpu_linear._library or cpu_linear.library()
    if not lib or torch.is_grad_enabled() or not library.cpu_fast_paths():
        return None
    if B != cache.batch or hidden.device.type != "cpu":
        return None
    plan = getattr(cache, "c_plan", None)
    if plan is None or plan.policy is not policy:
        plan = cache.c_plan = _Plan(policy, cache, lib) if _supported(policy) else None
    return plan if plan is not None and plan.ok else None


def _rows(t: Tensor, B: int, width: int, dtype: torch.dtype) -> Optional[Tensor]:
    t = t.reshape(B, -1).to(dtype).contiguous()
    return t if t.shape[1] == width else None


def decide(policy: nn.Module, cache, step: int, horizon: int, hidden: Tensor, token_embedding: Tensor, dense: Tensor,
           targets: Tensor, deviations: Tensor, prev: Tensor, uniforms: Optional[Tensor], temperature: float
           ) -> Optional[tuple[Tensor, Tensor, Tensor, Tensor]]:
    """PolicySource.next_actions' decision of every row in one C call: (actions [B], logp [B] (0 on dense
    steps), the scalars the network read [B, 8] (fp64), the new running deviations [B, 3]), the cache's
    position advanced; `uniforms` [B] in [0, 1) samples by inverse CDF, None picks the argmax. None (and
    nothing done) where the C step does not apply."""
    B = prev.shape[0]
    plan = _plan_for(policy, cache, B, hidden)
    if plan is None:
        return None
    h, e = _rows(hidden, B, plan.d_base, _F32), _rows(token_embedding, B, plan.d_base, _F32)
    if h is None or e is None:
        return None
    cache.check_room(1)
    dense = dense.reshape(B).to(torch.bool).contiguous()
    targets, deviations = targets.to(torch.float64).contiguous(), deviations.to(torch.float64).contiguous()
    prev = prev.reshape(B).to(torch.int64).contiguous()
    u = None if uniforms is None else uniforms.reshape(B).to(torch.float64).contiguous()
    scalars = torch.empty(B, 8, dtype=torch.float64)
    actions = torch.empty(B, dtype=torch.int64)
    logp = torch.empty(B, dtype=torch.float64)
    new_dev = torch.empty(B, 3, dtype=torch.float64)
    plan.lib.solc_policy_decide(plan.net_ref, plan.prior_ref, step, cache.length, horizon, h.data_ptr(), e.data_ptr(),
                                dense.data_ptr(), targets.data_ptr(), deviations.data_ptr(), prev.data_ptr(),
                                None if u is None else u.data_ptr(), temperature, plan.dense_index,
                                scalars.data_ptr(), actions.data_ptr(), logp.data_ptr(), new_dev.data_ptr(),
                                torch.get_num_threads())
    cache.advance(1)
    return actions, logp, scalars, new_dev


def step(policy: nn.Module, hidden: Tensor, token_embedding: Tensor, scalars: Tensor, prev_action: Tensor,
         cache) -> Optional[tuple[Tensor, Tensor]]:
    """(raw action head [B, 1, A], budget head [B, 1, 3]) of one incremental step in C, writing this step's
    keys and values at the cache's position (the caller advances it); None where the C step does not apply."""
    B, T = prev_action.shape
    plan = _plan_for(policy, cache, B, hidden) if T == 1 else None
    if plan is None:
        return None
    h, e = _rows(hidden, B, plan.d_base, _F32), _rows(token_embedding, B, plan.d_base, _F32)
    s = _rows(scalars, B, plan.n_scalars, _F32)
    if h is None or e is None or s is None:
        return None
    prev = prev_action.reshape(B).to(torch.int64).contiguous()
    if int(prev.min()) < 0 or int(prev.max()) > plan.n_actions:  # rows of the action embedding (C reads them)
        return None  # the embedding lookup raises as it does elsewhere
    logits = torch.empty(B, 1, plan.n_actions, dtype=_F32)
    budget = torch.empty(B, 1, 3, dtype=_F32)
    plan.lib.solc_policy_step(plan.net_ref, h.data_ptr(), e.data_ptr(), s.data_ptr(), prev.data_ptr(), cache.length,
                              logits.data_ptr(), budget.data_ptr(), torch.get_num_threads())
    return logits, budget
