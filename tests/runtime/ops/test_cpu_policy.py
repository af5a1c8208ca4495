"""runtime/ops/cpu_policy.py: a deployed policy decision in one C call equals the op-by-op torch decision
(the network to fp32 rounding; the budget guard's mask exactly), and a row's decision does not depend on
its batch mates."""
import contextlib

import pytest
import torch

from runtime.actions import ActionSpace
from runtime.budget import BudgetSpec
from runtime.cost_model import MeasuredCostModel
from runtime.ops import cpu_linear, cpu_policy
from runtime.policy import PolicyConfig, PolicyNet, PolicySource, budget_guard

pytestmark = pytest.mark.skipif(cpu_linear.library() is None, reason="needs the C library (a C compiler)")

D_BASE = 24


def _cost_spec(space):
    """A cost budget over a synthetic latency table (uneven costs in ~[0.46, 1], dense = 1)."""
    lat = [[float(0.2 + 0.25 * a + 0.15 * m + 0.4 * q ** 2)] for a, m, q in space.cost_table().tolist()]
    return BudgetSpec.cost(MeasuredCostModel(device="test", batch=1, contexts=[64], latency_ms=lat), context=64)


def _policy(kind="guarded", seed=0, d_model=32, n_heads=4, n_layers=1, flat=False):
    space = ActionSpace()
    extra = {"guarded": {"budget": _cost_spec(space).to_dict(), "budget_band": 0.02},
             "cost": {"budget": _cost_spec(space).to_dict()},
             "price": {"budget_head": "price"},
             "per-axis": {}}[kind]
    torch.manual_seed(seed)
    policy = PolicyNet(PolicyConfig(d_base=D_BASE, space=space.to_dict(), d_model=d_model, n_heads=n_heads,
                                    n_layers=n_layers, scalar_hidden=16, **extra)).eval()
    with torch.no_grad():
        for head in (policy.action_head, policy.budget_head):
            if flat:  # every action's logit equal: a decision's log-prob is -log(actions the guard allows)
                head.weight.zero_()
                head.bias.zero_()
            else:
                head.weight.normal_(0, 0.5)
                head.bias.normal_(0, 0.5)
        if flat:
            policy.sharpness.fill_(-40.0)  # kappa = softplus(-40) ~ 4e-18: no prior
    return policy


def _episode(source, policy, batch, horizon, targets, gen=None, seed=2, dense_steps=(0, 1)):
    """(actions [B, T], the recorded trajectory) of one episode on random hidden states and embeddings."""
    source.reset(policy.space, batch, targets, horizon, gen)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        actions = [source.next_actions(t, torch.randn(batch, D_BASE, generator=g), torch.randn(batch, D_BASE, generator=g),
                                       torch.full((batch,), t in dense_steps)) for t in range(horizon)]
    return torch.stack(actions, 1), source.trajectory()


@pytest.mark.parametrize("kind, d_model, n_heads, n_layers", [("guarded", 32, 4, 1), ("per-axis", 64, 2, 2),
                                                               ("price", 32, 4, 1), ("cost", 48, 3, 1)])
@pytest.mark.parametrize("batch", [1, 5])
def test_c_step_equals_the_op_by_op_step(kind, d_model, n_heads, n_layers, batch):
    policy = _policy(kind, d_model=d_model, n_heads=n_heads, n_layers=n_layers)
    g = torch.Generator().manual_seed(1)
    steps = 6
    fast, slow = policy.new_cache(batch, steps), policy.new_cache(batch, steps)
    for t in range(steps):
        args = (torch.randn(batch, 1, D_BASE, generator=g), torch.randn(batch, 1, D_BASE, generator=g),
                torch.rand(batch, 1, 8, generator=g, dtype=torch.float64),
                torch.randint(0, policy.n_actions + 1, (batch, 1), generator=g))
        with torch.no_grad():
            a = policy(*args, cache=fast, horizon=steps)
            with cpu_policy.op_by_op():
                b = policy(*args, cache=slow, horizon=steps)
        torch.testing.assert_close(a.logits, b.logits, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(a.budget, b.budget, rtol=1e-5, atol=1e-6)
    assert fast.c_plan is not None and fast.c_plan.ok  # the C step ran
    assert fast.length == slow.length == steps and int(fast.position) == steps
    for k in range(n_layers):
        torch.testing.assert_close(fast.keys[k], slow.keys[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(fast.values[k], slow.values[k], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["guarded", "per-axis", "price"])
@pytest.mark.parametrize("greedy", [True, False])
def test_c_decisions_equal_the_op_by_op_decisions(kind, greedy):
    policy = _policy(kind)
    batch, horizon = 6, 12
    targets = torch.tensor([[0.5, 1, 1], [0.55, 0.7, 0.5], [0.62, 0.9, 0.8], [0.7, 0.4, 1], [0.8, 1, 0.4],
                            [0.95, 0.6, 0.7]], dtype=torch.float64)
    runs = []
    for c in (True, False):
        source = PolicySource(policy, greedy=greedy, temperature=1.3, record=True)
        with contextlib.nullcontext() if c else cpu_policy.op_by_op():
            runs.append(_episode(source, policy, batch, horizon, targets, gen=torch.Generator().manual_seed(5)))
        if c:
            assert source.cache.c_plan is not None and source.cache.c_plan.ok
    (fast, ft), (slow, st) = runs
    assert torch.equal(fast, slow)
    assert torch.all(fast[:, :2] == policy.space.dense_index) and torch.all(ft.logp[:, :2] == 0)
    assert len(set(fast[:, 2:].flatten().tolist())) > 3  # the decisions are not all one action
    assert torch.equal(ft.scalars, st.scalars)  # progress, dense flags, targets and running deviations: exact
    assert torch.equal(ft.prev_action, st.prev_action) and torch.equal(ft.dense, st.dense)
    # fp32 rounding of the heads (~1e-6) times the anchored prior's slope (2 kappa |cost - anchor|, kappa 20)
    torch.testing.assert_close(ft.logp, st.logp, rtol=0, atol=1e-4)
    assert torch.equal(ft.hidden, st.hidden) and torch.equal(ft.token_embedding, st.token_embedding)


def test_c_guard_allows_exactly_what_budget_guard_allows():
    """A flat policy (every logit equal) picks uniformly among the actions the guard allows: its recorded
    log-prob is -log(allowed), so it counts the C mask; budget_guard over the recorded scalars must allow
    exactly that many, the sampled action among them, at every step of episodes that hit the band's edges."""
    policy = _policy("guarded", flat=True)
    horizon, batch = 10, 8
    costs = policy.cost_table64[:, 0]
    lo, hi = float(costs.min()), float(costs.max())
    bit = 0
    for seed in range(6):
        targets = torch.zeros(batch, 3, dtype=torch.float64)
        targets[:, 0] = torch.linspace(lo, hi, batch)
        targets[:, 1:] = 1
        source = PolicySource(policy, greedy=False, temperature=1.0, record=True)
        actions, traj = _episode(source, policy, batch, horizon, targets, gen=torch.Generator().manual_seed(seed),
                                 dense_steps=(0,))
        assert source.cache.c_plan is not None
        allowed = budget_guard(traj.scalars, costs, horizon, 0.02)
        controlled = ~traj.dense
        n = allowed.sum(-1).double()
        torch.testing.assert_close(traj.logp[controlled], -torch.log(n[controlled]), rtol=0, atol=1e-9)
        assert allowed.gather(-1, actions[..., None])[controlled].all()
        bit += int((n[controlled] < len(costs)).sum())
    assert bit > 20  # the guard masked actions at many steps


@pytest.mark.parametrize("greedy", [True, False])
def test_a_rows_c_decisions_do_not_depend_on_its_batch_mates(greedy):
    policy = _policy("guarded", seed=3)
    horizon = 8
    targets = torch.tensor([[0.55, 1, 1], [0.6, 1, 1], [0.75, 1, 1], [0.9, 1, 1]], dtype=torch.float64)
    gens = lambda seeds: [torch.Generator().manual_seed(s) for s in seeds]  # noqa: E731  one per row
    batch, btraj = _episode(PolicySource(policy, greedy=greedy, record=True), policy, 4, horizon, targets,
                            gen=gens([10, 11, 12, 13]), seed=4)
    g = torch.Generator().manual_seed(4)
    inputs = [(torch.randn(4, D_BASE, generator=g), torch.randn(4, D_BASE, generator=g)) for _ in range(horizon)]
    for r in range(4):
        source = PolicySource(policy, greedy=greedy, record=True)
        source.reset(policy.space, 1, targets[r:r + 1], horizon, gens([10 + r]))
        with torch.no_grad():
            alone = torch.stack([source.next_actions(t, h[r:r + 1], e[r:r + 1], torch.full((1,), t in (0, 1)))
                                 for t, (h, e) in enumerate(inputs)], 1)
        assert torch.equal(alone, batch[r:r + 1])
        assert torch.equal(source.trajectory().logp, btraj.logp[r:r + 1])


def test_a_policy_changed_between_episodes_is_read_as_it_is_now():
    """The plan (and the one-row GEMVs' packed weight copies) are made per episode: weights trained in
    place between two episodes are what the second one reads."""
    policy = _policy("guarded")
    targets = torch.tensor([[0.7, 1, 1]], dtype=torch.float64)

    def both():
        out = []
        for c in (True, False):
            with contextlib.nullcontext() if c else cpu_policy.op_by_op():
                out.append(_episode(PolicySource(policy, greedy=True, record=True), policy, 1, 8, targets, seed=9)[1])
        torch.testing.assert_close(out[0].logp, out[1].logp, rtol=0, atol=1e-5)
        assert torch.equal(out[0].actions, out[1].actions)
        return out[0]

    before = both()
    with torch.no_grad():
        for lin in (policy.hidden_in[1], policy.blocks[0].qkv, policy.blocks[0].mlp[2], policy.action_head):
            lin.weight.mul_(-1.5)  # in place: the same storage, new values
    after = both()
    assert not torch.equal(before.logp, after.logp)


def test_the_c_decision_stands_aside_where_it_does_not_apply():
    policy = _policy("guarded").double()  # fp64 weights: the torch path
    source = PolicySource(policy, greedy=True, record=True)
    _episode(source, policy, 2, 4, torch.full((2, 3), 0.7, dtype=torch.float64))
    plan = getattr(source.cache, "c_plan", None)
    assert plan is None or not plan.ok
    policy = _policy("guarded")
    source = PolicySource(policy, greedy=True)
    source.reset(policy.space, 1, torch.full((1, 3), 0.7, dtype=torch.float64), 2)
    with torch.no_grad():
        for t in range(2):
            source.next_actions(t, torch.randn(1, D_BASE), torch.randn(1, D_BASE), torch.zeros(1, dtype=torch.bool))
        with pytest.raises(ValueError, match="policy cache holds 2 steps"):
            source.next_actions(2, torch.randn(1, D_BASE), torch.randn(1, D_BASE), torch.zeros(1, dtype=torch.bool))
    assert source.cache.length == 2
    with torch.no_grad(), pytest.raises(IndexError):  # an action index past the embedding: torch's error
        policy(torch.randn(1, 1, D_BASE), torch.randn(1, 1, D_BASE), torch.rand(1, 1, 8, dtype=torch.float64),
               torch.tensor([[policy.n_actions + 1]]), cache=policy.new_cache(1, 2), horizon=2)
