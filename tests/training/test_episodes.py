"""Rollouts: one shared prefill, teacher-forced log-probs, realized budgets, sampled targets."""
import pytest
import torch

from runtime.actions import ActionSpace
from runtime.dispatch import StepDispatcher
from runtime.generate import score
from runtime.policy import PolicyConfig, PolicyNet, PolicySource
from runtime.schedulers import DENSE_PREFIX, Fixed, Random, Schedule
from training.episodes import TARGET_RANGES, realized_budget, rollout, sample_targets


def _contexts(sol, n, length, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, sol.token_embedding.shape[0], (n, length), generator=g)


class CountingDispatcher(StepDispatcher):
    """A StepDispatcher that records the shape of every prefill and step it runs."""

    def __init__(self, sol):
        super().__init__(sol, mode="eager")
        self.calls = []

    def prefill(self, ids, *args, **kwargs):
        self.calls.append(tuple(ids.shape))
        return super().prefill(ids, *args, **kwargs)

    def step(self, ids, *args, **kwargs):
        self.calls.append(tuple(ids.shape))
        return super().step(ids, *args, **kwargs)


def test_one_prefill_serves_k_schedules(tiny_sol):
    counting = CountingDispatcher(tiny_sol)
    ctx = _contexts(tiny_sol, 3, 30)
    sched = torch.randint(0, len(tiny_sol.space), (3 * 16, 8))
    ep = rollout(tiny_sol, ctx, Schedule(sched), torch.full((3,), 0.5), group=16, horizon=8, dispatcher=counting)
    prefills = [c for c in counting.calls if c[1] > 1]
    assert prefills == [(3, 30 - 8 - 1)]  # ONE prefill call covering the 3 contexts
    assert counting.calls[1:] == [(48, 1)] * 8  # then one batched call per controlled step
    assert ep.logp.shape == (48, 8) and ep.group == 16 and ep.prefill_len == 21
    assert torch.equal(ep.actions, sched)


@pytest.mark.parametrize("use_policy", [False, True])
def test_rollout_logps_equal_teacher_forced_forward_fp64(tiny_sol64, use_policy):
    """DESIGN invariant 3: the scored log-probs are those of sol(ids, actions) over the whole sequence."""
    sol = tiny_sol64
    C, K, T, L = 2, 3, 6, 20
    ctx = _contexts(sol, C, L, seed=1)
    if use_policy:
        torch.manual_seed(0)
        policy = PolicyNet(PolicyConfig.for_model(sol, d_model=32)).double()
        torch.nn.init.normal_(policy.action_head.weight, std=1.0)
        source = PolicySource(policy, temperature=1.3)
        gen = [torch.Generator().manual_seed(i) for i in range(C)]
    else:
        source, gen = Schedule(torch.randint(0, len(sol.space), (C * K, T))), None
    ep = rollout(sol, ctx, source, torch.tensor([0.5, 0.7, 0.6]), group=K, horizon=T, generator=gen)
    P = L - T - 1
    ids = ctx.repeat_interleave(K, 0)
    actions = torch.full((C * K, L), sol.space.dense_index)
    actions[:, P : P + T] = ep.actions
    with torch.no_grad():
        logits = sol(ids, actions).logits
    lp = torch.log_softmax(logits, -1)[:, P : P + T].gather(-1, ids[:, P + 1 : P + T + 1, None]).squeeze(-1)
    torch.testing.assert_close(ep.logp, lp, atol=1e-6, rtol=0)
    assert torch.equal(ep.tokens, ids[:, P + 1 : P + T + 1])


def test_rollout_equals_runtime_score(tiny_sol):
    """The same schedule scored by training and by the deployed runtime's decode loop."""
    sol = tiny_sol
    ctx = _contexts(sol, 2, 24, seed=2)
    sched = torch.randint(0, len(sol.space), (2, 8))
    ep = rollout(sol, ctx, Schedule(sched), torch.ones(3), group=1, horizon=8)
    out = score(sol, ctx, prompt_len=24 - 8, schedule=sched)
    torch.testing.assert_close(ep.logp, out.logprobs, atol=1e-5, rtol=0)
    assert torch.equal(ep.actions, out.actions)


def test_realized_budget_from_actions_dense_steps_excluded(tiny_sol):
    sol = tiny_sol
    space = sol.space
    T = 10
    ctx = _contexts(sol, 1, T + 2)  # prefill of 1 token: controlled steps start at position 1
    sched = torch.zeros(4, T, dtype=torch.long)  # the cheapest action everywhere
    ep = rollout(sol, ctx, Schedule(sched), torch.full((3,), 0.5), group=4, horizon=T)
    n_dense = DENSE_PREFIX - 1  # positions 1..6
    assert torch.all(ep.actions[:, :n_dense] == space.dense_index)  # forced dense, whatever the schedule
    assert torch.all(~ep.controlled[:, :n_dense]) and torch.all(ep.controlled[:, n_dense:])
    cheapest = space.cost_table()[0]
    torch.testing.assert_close(ep.budget, cheapest.expand(4, 3))
    # the budget is a function of the actions that ran
    torch.testing.assert_close(realized_budget(space, ep.actions, ep.controlled), ep.budget)
    none = realized_budget(space, ep.actions, torch.zeros_like(ep.controlled))
    assert torch.all(none == 1.0)


def test_fixed_and_random_baselines_roll_out_at_their_budget(tiny_sol):
    sol = tiny_sol
    ctx = _contexts(sol, 2, 40)
    targets = torch.tensor([[0.35, 0.6, 0.5], [0.8, 0.9, 0.4]], dtype=torch.float64)
    for source in (Fixed(), Random()):
        ep = rollout(sol, ctx, source, targets, group=2, horizon=16, generator=torch.Generator().manual_seed(0))
        # whole steps of the two nearest levels: off by at most half a step of the widest level gap
        assert (ep.budget - ep.targets).abs().max() <= 0.5 * 0.5 / 16 + 1e-9


@pytest.mark.parametrize("quant, quant_lo", [("activation", 5 / 16), ("weight", 4 / 16)])
def test_sample_targets(quant, quant_lo):
    g = torch.Generator().manual_seed(0)
    t = sample_targets(ActionSpace(quant=quant), 2000, g)
    assert TARGET_RANGES["quant"] == (5 / 16, 1.0)  # the paper's range: its grid's cheapest bits/16
    for i, axis in enumerate(("attn", "mlp", "quant")):
        lo, hi = TARGET_RANGES[axis] if axis != "quant" else (quant_lo, 1.0)
        assert t[:, i].min() >= lo and t[:, i].max() <= hi
        assert t[:, i].min() < lo + 0.01 and t[:, i].max() > hi - 0.01
    only_mlp = sample_targets(ActionSpace(["mlp"]), 5, torch.Generator().manual_seed(0))
    assert torch.all(only_mlp[:, [0, 2]] == 1.0)
    assert torch.equal(only_mlp[:, 1], sample_targets(ActionSpace(), 5, torch.Generator().manual_seed(0))[:, 1])


def test_sample_targets_follow_a_levels_grid():
    """Each enabled axis samples from its grid's cheapest level to 1 (what the grid can meet), as quant does:
    a grid without attn 0.1 is never asked for less, one with mlp 0.2 is asked for all it can do."""
    space = ActionSpace(["attn", "mlp", "quant"], {"attn": [0.3, 1.0], "mlp": [0.2, 0.6, 1.0], "quant": [8, 16]})
    t = sample_targets(space, 2000, torch.Generator().manual_seed(0))
    for i, lo in enumerate((0.3, 0.2, 0.5)):
        assert lo <= t[:, i].min() < lo + 0.01 and t[:, i].max() <= 1.0
    # explicit ranges still win
    t = sample_targets(space, 100, torch.Generator().manual_seed(0), {"attn": (0.5, 0.6)})
    assert 0.5 <= t[:, 0].min() and t[:, 0].max() <= 0.6 and t[:, 1].min() < 0.3


def test_rollout_rejects_short_context(tiny_sol):
    with pytest.raises(ValueError, match="no prefill"):
        rollout(tiny_sol, _contexts(tiny_sol, 1, 9), Fixed(), torch.ones(3), group=1, horizon=8)
