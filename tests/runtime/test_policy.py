"""The policy network: config round trip, incremental == full-sequence, PolicySource bookkeeping."""
import pytest
import torch

from runtime.actions import ActionSpace
from runtime.policy import (
    POLICY_VERSION,
    PolicyConfig,
    PolicyNet,
    PolicySource,
    sequence_log_probs,
)

D_BASE = 24


def _policy(space=None, dtype=torch.float32, seed=0, **kw):
    torch.manual_seed(seed)
    config = PolicyConfig(d_base=D_BASE, space=(space or ActionSpace()).to_dict(), d_model=32, n_heads=4, scalar_hidden=16, **kw)
    policy = PolicyNet(config).to(dtype)
    with torch.no_grad():  # the heads start at zero (uniform policy); make the test non-trivial
        for head in (policy.action_head, policy.budget_head):
            head.weight.normal_(0, 0.5)
            head.bias.normal_(0, 0.5)
    return policy


def _inputs(batch, steps, dtype, seed=1, n_actions=27):
    g = torch.Generator().manual_seed(seed)
    return (
        torch.randn(batch, steps, D_BASE, generator=g, dtype=dtype),
        torch.randn(batch, steps, D_BASE, generator=g, dtype=dtype),
        torch.rand(batch, steps, 8, generator=g, dtype=dtype),
        torch.randint(0, n_actions + 1, (batch, steps), generator=g),
    )


def test_config_json_round_trip_and_version():
    config = PolicyConfig(d_base=576, space=ActionSpace(["mlp", "quant"]).to_dict(), d_model=64, n_heads=2)
    again = PolicyConfig.from_json(config.to_json())
    assert again == config
    assert again.action_space == ActionSpace(["mlp", "quant"])
    assert config.n_actions == 9
    bad = config.to_dict() | {"version": POLICY_VERSION + 1}
    with pytest.raises(ValueError, match="version"):
        PolicyConfig.from_dict(bad)
    with pytest.raises(ValueError, match="unknown PolicyConfig fields"):
        PolicyConfig.from_dict(config.to_dict() | {"dropout": 0.1})
    with pytest.raises(ValueError, match="multiple of n_heads"):
        PolicyConfig(d_base=8, space=ActionSpace().to_dict(), d_model=30, n_heads=4)


def test_defaults_are_the_papers():
    config = PolicyConfig(d_base=576, space=ActionSpace(quant="activation").to_dict())
    assert (config.d_model, config.n_heads, config.n_layers) == (512, 4, 1)
    policy = PolicyNet(config)
    hidden, emb, scalars, prev = _inputs(2, 3, torch.float32)
    hidden = torch.randn(2, 3, 576)
    emb = torch.randn(2, 3, 576)
    out = policy(hidden, emb, scalars, prev)
    assert out.logits.shape == (2, 3, 27) and out.budget.shape == (2, 3, 3)
    assert torch.all(out.budget == 0)  # zero-initialised heads
    # untrained "anchored" policy: the quadratic prior around the needed cost, kappa = 20
    need = (scalars[..., 2:5] - scalars[..., 5:8] / (1 - scalars[..., 0:1])).clamp(0.1, 1.0)
    need = torch.maximum(need, torch.tensor([0.1, 0.4, 0.3125]))
    costs = ActionSpace(quant="activation").cost_table().float()
    expected = -20.0 * ((costs[None, None] - need[..., None, :]) ** 2).sum(-1)
    torch.testing.assert_close(out.logits, expected, atol=1e-4, rtol=1e-5)
    price = PolicyNet(PolicyConfig(d_base=576, space=ActionSpace().to_dict(), budget_head="price"))
    assert torch.all(price(hidden, emb, scalars, prev).logits == 0)  # uniform
    with pytest.raises(ValueError, match="budget_head"):
        PolicyConfig(d_base=576, space=ActionSpace().to_dict(), budget_head="value")


@pytest.mark.parametrize("target", [[0.35, 0.6, 0.5], [0.8, 0.9, 0.7], [0.1, 0.4, 0.3125], [1.0, 1.0, 1.0]])
def test_untrained_anchored_greedy_policy_tracks_its_target(target):
    space = ActionSpace()
    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig(d_base=D_BASE, space=space.to_dict(), d_model=32, n_heads=4))
    T = 16
    targets = torch.tensor([target], dtype=torch.float64)
    acts = _run_source(PolicySource(policy, greedy=True), policy, space, 1, T, targets)
    realized = space.cost_table()[acts[0]].mean(0)
    assert (realized - targets[0]).abs().max() <= 0.5 / T + 1e-9, (realized, target)


# fp32: the two paths multiply in different shapes (BLAS blocking), ~1e-6 relative, amplified by the
# anchored prior (kappa 20); fp64 is the exact check.
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 2e-3), (torch.float64, 1e-10)])
def test_incremental_equals_full_sequence(dtype, tol):
    policy = _policy(dtype=dtype, n_layers=2)
    hidden, emb, scalars, prev = _inputs(3, 7, dtype)
    full = policy(hidden, emb, scalars, prev, temperature=1.3)
    cache = policy.new_cache(3, 7)
    steps = [policy(hidden[:, t : t + 1], emb[:, t : t + 1], scalars[:, t : t + 1], prev[:, t : t + 1], cache=cache, temperature=1.3) for t in range(7)]
    logits = torch.cat([s.logits for s in steps], dim=1)
    torch.testing.assert_close(torch.log_softmax(logits, -1), torch.log_softmax(full.logits, -1), atol=tol, rtol=0)
    # a chunk of several steps on top of a cache equals the full sequence too
    cache = policy.new_cache(3, 7)
    a = policy(hidden[:, :3], emb[:, :3], scalars[:, :3], prev[:, :3], cache=cache)
    b = policy(hidden[:, 3:], emb[:, 3:], scalars[:, 3:], prev[:, 3:], cache=cache)
    torch.testing.assert_close(torch.cat([a.logits, b.logits], 1), policy(hidden, emb, scalars, prev).logits, atol=tol, rtol=0)
    with pytest.raises(ValueError, match="does not fit"):
        policy(hidden[:, :1], emb[:, :1], scalars[:, :1], prev[:, :1], cache=cache)


def test_budget_head_prices_actions_by_cost():
    policy = _policy(budget_head="price")
    with torch.no_grad():
        policy.action_head.weight.zero_()
        policy.action_head.bias.zero_()
        policy.budget_head.weight.zero_()
        policy.budget_head.bias.copy_(torch.tensor([-4.0, 0.0, 0.0]))
    out = policy(*_inputs(1, 1, torch.float32), temperature=2.0)
    expected = -4.0 * ActionSpace().cost_table()[:, 0].float() / 2.0
    torch.testing.assert_close(out.logits[0, 0], expected)


def _run_source(source, policy, space, batch, horizon, targets, dense_steps=(), gen=None, seed=2):
    source.reset(space, batch, targets, horizon, gen)
    g = torch.Generator().manual_seed(seed)
    acts = []
    for t in range(horizon):
        dense = torch.full((batch,), t in dense_steps)
        acts.append(source.next_actions(t, torch.randn(batch, D_BASE, generator=g), torch.randn(batch, D_BASE, generator=g), dense))
    return torch.stack(acts, 1)


def test_policy_source_recorded_logps_equal_full_sequence():
    space = ActionSpace()
    policy = _policy(space)
    source = PolicySource(policy, temperature=1.3, record=True)
    targets = torch.tensor([[0.3, 0.6, 0.5], [0.9, 0.9, 1.0]], dtype=torch.float64)
    actions = _run_source(source, policy, space, 2, 6, targets, dense_steps=(0,), gen=torch.Generator().manual_seed(0))
    traj = source.trajectory()
    assert torch.equal(traj.actions, actions)
    assert torch.all(actions[:, 0] == space.dense_index) and torch.all(traj.dense[:, 0])
    logp, entropy = sequence_log_probs(policy, traj, 1.3)
    torch.testing.assert_close(logp[:, 1:], traj.logp[:, 1:], atol=2e-3, rtol=0)
    assert torch.all(entropy > 0)
    # scalars: progress t/T, dense flag, targets, running deviations from the chosen actions
    costs = space.cost_table()[actions]  # [B, T, 3]
    assert torch.allclose(traj.scalars[0, :, 0], torch.arange(6, dtype=torch.float64) / 6)
    assert torch.equal(traj.scalars[:, :, 1], traj.dense.double())
    assert torch.allclose(traj.scalars[:, :, 2:5], targets[:, None].expand(2, 6, 3))
    step_dev = (costs - targets[:, None]) / 6
    step_dev[:, 0] = 0  # the dense step counts in no budget
    expected_dev = torch.cumsum(step_dev, 1) - step_dev  # deviation BEFORE each step
    torch.testing.assert_close(traj.scalars[:, :, 5:8], expected_dev)
    assert torch.equal(traj.prev_action[:, 0], torch.full((2,), policy.start_action))
    assert torch.equal(traj.prev_action[:, 1:], actions[:, :-1])


def test_policy_source_sampling_is_reproducible_and_greedy_is_argmax():
    space = ActionSpace()
    policy = _policy(space)
    targets = torch.full((4, 3), 0.6, dtype=torch.float64)
    a = _run_source(PolicySource(policy), policy, space, 4, 5, targets, gen=torch.Generator().manual_seed(7))
    b = _run_source(PolicySource(policy), policy, space, 4, 5, targets, gen=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    # one generator per group of rows: a group samples the same whatever shares its batch
    gens = lambda: [torch.Generator().manual_seed(s) for s in (11, 12)]  # noqa: E731
    both = _run_source(PolicySource(policy), policy, space, 4, 5, targets, gen=gens(), seed=3)
    assert both.shape == (4, 5)
    with pytest.raises(ValueError, match="evenly"):
        _run_source(PolicySource(policy), policy, space, 3, 2, targets[:3], gen=gens())
    src = PolicySource(policy, greedy=True, record=True)
    greedy = _run_source(src, policy, space, 4, 5, targets)
    logp, _ = sequence_log_probs(policy, src.trajectory(), policy.config.temperature)
    full = policy(*src.trajectory()[:4]).logits
    assert torch.equal(greedy, full.argmax(-1))


def test_policy_source_rejects_other_space():
    policy = _policy(ActionSpace(["mlp"]))
    with pytest.raises(ValueError, match="trained for"):
        PolicySource(policy).reset(ActionSpace(), 1, torch.ones(3), 4)


def test_save_load_round_trip(tmp_path):
    policy = _policy()
    policy.save(tmp_path / "p.pt")
    again = PolicyNet.load(tmp_path / "p.pt")
    assert again.config == policy.config
    inputs = _inputs(2, 3, torch.float32)
    assert torch.equal(again(*inputs).logits, policy(*inputs).logits)


# -- the budget guard (cost budgets) --------------------------------------------------------------------

def _cost_spec(space):
    """A cost budget over a synthetic latency table: costs spread unevenly over [~0.46, 1] like the bytes
    model's (a cluster of cheap low-bit actions, gaps above), dense = 1."""
    from runtime.budget import BudgetSpec
    from runtime.cost_model import MeasuredCostModel

    table = space.cost_table()
    lat = [[float(0.2 + 0.25 * a + 0.15 * m + 0.4 * q ** 2)] for a, m, q in table.tolist()]
    return BudgetSpec.cost(MeasuredCostModel(device="test", batch=1, contexts=[64], latency_ms=lat), context=64)


def _guarded_policy(band=0.02, seed=0, **kw):
    space = ActionSpace()
    return _policy(space, seed=seed, budget=_cost_spec(space).to_dict(), budget_band=band, **kw)


def test_budget_guard_allows_exactly_the_actions_that_keep_the_episode_within_the_band():
    # brute force over every sequence of the remaining steps: an action after which SOME continuation
    # keeps every running deviation within the band must be allowed; an allowed action keeps the
    # deviation within the band whenever any action does; something is always allowed
    from itertools import accumulate, product

    from runtime.policy import budget_guard

    costs = torch.tensor([0.46, 0.5, 0.57, 0.77, 1.0], dtype=torch.float64)
    T, band = 4, 0.03
    g = torch.Generator().manual_seed(0)
    checked = 0
    for _ in range(300):
        s = int(torch.randint(0, T, (1,), generator=g))
        target = float(0.46 + 0.54 * torch.rand(1, generator=g, dtype=torch.float64))
        dev = float((torch.rand(1, generator=g, dtype=torch.float64) - 0.5) * 0.1) if s else 0.0
        scalars = torch.tensor([s / T, 0, target, 1, 1, dev, 0, 0], dtype=torch.float64)
        allowed = budget_guard(scalars, costs, T, band)
        assert allowed.any()
        after = dev + (costs - target) / T
        if (after.abs() <= band).any():
            assert torch.all(after[allowed].abs() <= band + 1e-12), (s, target, dev)
        for a in range(5):
            ok = any(all(abs(d) <= band for d in accumulate([float(after[a])] + [(c - target) / T for c in seq]))
                     for seq in product(costs.tolist(), repeat=T - s - 1))
            if ok:
                assert allowed[a], (s, target, dev, a)
                checked += 1
    assert checked > 100


@pytest.mark.parametrize("target", [0.47, 0.5, 0.6, 0.7, 0.8, 0.95])
def test_guarded_greedy_policy_ends_within_the_band_whatever_its_logits(target):
    # random, strong action logits, and one policy that wants the same action whatever the budget (the
    # failure mode of an unguarded greedy policy): guarded, every episode ends within band + one cost
    # gap / T of its target
    T, band = 16, 0.02
    targets = torch.tensor([[target, 1.0, 1.0]], dtype=torch.float64)

    def stubborn(policy, seed):
        with torch.no_grad():
            if seed == 0:
                for head in (policy.action_head, policy.budget_head):
                    head.weight.zero_()
                    head.bias.zero_()
                policy.action_head.bias[13] = 50.0
            else:
                policy.action_head.bias.normal_(0, 5.0, generator=torch.Generator().manual_seed(seed))
        return policy

    for seed in range(4):
        policy = stubborn(_guarded_policy(band, seed=seed), seed)
        costs = policy.cost_table64[:, 0]
        gap = float(costs.sort().values.diff().max())
        acts = _run_source(PolicySource(policy, greedy=True), policy, policy.space, 1, T, targets)
        realized = float(costs[acts[0]].mean())
        assert abs(realized - target) <= band + gap / T + 1e-9, (seed, realized, target)
    space = policy.space
    unguarded = stubborn(_policy(space, seed=0, budget=_cost_spec(space).to_dict()), 0)
    acts = _run_source(PolicySource(unguarded, greedy=True), unguarded, space, 1, T, targets)
    assert acts[0].tolist() == [13] * T


def test_guarded_policy_recorded_logps_equal_full_sequence_and_samples_only_allowed_actions():
    # training == deployment: the PPO recompute (whole sequence) applies the same mask as the rollout
    from runtime.policy import GUARDED_LOGIT, budget_guard

    policy = _guarded_policy(0.02)
    space = policy.space
    source = PolicySource(policy, temperature=1.3, record=True)
    targets = torch.tensor([[0.5, 1, 1], [0.62, 1, 1], [0.9, 1, 1]], dtype=torch.float64)
    _run_source(source, policy, space, 3, 8, targets, gen=torch.Generator().manual_seed(0))
    traj = source.trajectory()
    logp, entropy = sequence_log_probs(policy, traj, 1.3)
    torch.testing.assert_close(logp, traj.logp, atol=2e-3, rtol=0)
    assert torch.isfinite(entropy).all() and torch.all(entropy >= 0)
    allowed = budget_guard(traj.scalars, policy.cost_table64[:, 0], 8, 0.02)
    assert allowed.gather(-1, traj.actions[..., None]).all()
    assert (~allowed).any()  # the mask did bite somewhere
    logits = policy(*traj[:4], temperature=1.3, horizon=8).logits
    assert torch.all(logits[~allowed] == GUARDED_LOGIT)
    with pytest.raises(ValueError, match="horizon"):
        policy(*traj[:4])


def test_budget_band_config_checks_and_old_configs_load_without_a_guard():
    space = ActionSpace()
    with pytest.raises(ValueError, match="needs a cost budget"):
        PolicyConfig(d_base=8, space=space.to_dict(), d_model=8, n_heads=2, budget_band=0.02)
    with pytest.raises(ValueError, match="budget_band"):
        PolicyConfig(d_base=8, space=space.to_dict(), d_model=8, n_heads=2, budget=_cost_spec(space).to_dict(), budget_band=1.5)
    with pytest.raises(ValueError, match="budget_band"):
        PolicyConfig(d_base=8, space=space.to_dict(), d_model=8, n_heads=2, budget=_cost_spec(space).to_dict(), budget_band=True)
    config = PolicyConfig(d_base=8, space=space.to_dict(), d_model=8, n_heads=2, budget=_cost_spec(space).to_dict(), budget_band=0.02)
    old = {k: v for k, v in config.to_dict().items() if k != "budget_band"}  # written before the guard
    assert PolicyConfig.from_dict(old).budget_band is None
    assert PolicyConfig.from_json(config.to_json()).budget_band == 0.02


def test_op_by_op_decisions_run_cpu_linear_and_do_not_depend_on_batch_mates(monkeypatch):
    """Without the C decision (runtime/ops/cpu_policy.py; tests/runtime/ops/test_cpu_policy.py), a deployed
    step (no autograd, one step) runs its linears on cpu_linear: a row's logits are the same bits alone or
    inside a batch of 4, and equal nn.Linear's to fp32 rounding."""
    from runtime.ops import cpu_linear, cpu_policy

    policy = _policy()
    hidden, emb, scalars, prev = _inputs(4, 3, torch.float32)
    calls = []
    real = cpu_linear.linear_cpu
    monkeypatch.setattr(cpu_linear, "linear_cpu", lambda *a: calls.append(a[0].shape) or real(*a))

    def steps(rows):
        cache = policy.new_cache(len(rows), 3)
        with torch.no_grad():
            return torch.cat([policy(hidden[rows, t:t + 1], emb[rows, t:t + 1], scalars[rows, t:t + 1],
                                     prev[rows, t:t + 1], cache=cache).logits for t in range(3)], 1)

    with cpu_policy.op_by_op():
        batch = steps([0, 1, 2, 3])
        assert len(calls) == 3 * 10 and all(s[1] == 1 for s in calls)  # ten linears a step, all on cpu_linear
        for r in range(4):
            assert torch.equal(steps([r]), batch[r:r + 1])
    calls.clear()
    with_grad = policy(hidden, emb, scalars, prev).logits  # training's full sequence: nn.Linear
    assert not calls
    torch.testing.assert_close(batch, with_grad.detach(), atol=2e-3, rtol=0)


# -- user-facing checks: policy files and PolicySource arguments -------------------------------------

def test_load_refuses_truncated_foreign_and_future_files_naming_them(tmp_path):
    import solc
    from runtime.policy import PolicyFileError

    policy = _policy()
    good = tmp_path / "good.pt"
    policy.save(good)
    data = good.read_bytes()
    (tmp_path / "trunc.pt").write_bytes(data[: len(data) // 2])
    torch.save(policy.state_dict(), tmp_path / "weights_only.pt")
    state = policy.state()
    state["config"] = dict(state["config"], version=POLICY_VERSION + 1)
    torch.save(state, tmp_path / "future.pt")
    torch.save({"version": 1, "policy": policy.state(), "optimizer": {}}, tmp_path / "checkpoint.pt")
    for name, text in [("trunc.pt", "not a readable policy file"), ("weights_only.pt", "not a policy file"),
                       ("future.pt", f"version {POLICY_VERSION + 1} is not supported"), ("checkpoint.pt", "training checkpoint")]:
        with pytest.raises(PolicyFileError, match=text) as info:
            PolicyNet.load(tmp_path / name)
        assert str(tmp_path / name) in str(info.value)
        assert isinstance(info.value, solc.AssetError) and isinstance(info.value, ValueError)
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        PolicyNet.load(tmp_path / "missing.pt")


def test_save_replaces_an_existing_file_atomically(tmp_path, monkeypatch):
    path = tmp_path / "p.pt"
    old = _policy(seed=0)
    old.save(path)
    before = path.read_bytes()

    def failing_save(obj, f, *args, **kwargs):
        f.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        _policy(seed=1).save(path)
    monkeypatch.undo()
    assert path.read_bytes() == before  # the old file is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.pt"]  # no temporary left behind
    new = _policy(seed=1)
    new.save(path)
    inputs = _inputs(1, 2, torch.float32)
    assert torch.equal(PolicyNet.load(path)(*inputs).logits, new(*inputs).logits)


@pytest.mark.parametrize("kwargs, argument, text", [
    (dict(temperature=0), "temperature", "> 0"),
    (dict(temperature=-1.0), "temperature", "> 0"),
    (dict(temperature=float("nan")), "temperature", "finite"),
    (dict(temperature="hot"), "temperature", "'hot'"),
    (dict(greedy="yes"), "greedy", "True or False"),
    (dict(record=None), "record", "True or False"),
])
def test_policy_source_checks_its_arguments(kwargs, argument, text):
    import solc

    with pytest.raises(solc.ArgumentError, match=text) as info:
        PolicySource(_policy(), **kwargs)
    assert info.value.argument == argument


def test_policy_source_refuses_a_path_or_a_policy_of_another_model():
    import solc

    with pytest.raises(solc.ArgumentTypeError, match="PolicyNet.load") as info:
        PolicySource("runs/x/policy.pt")
    assert info.value.argument == "policy"
    src = PolicySource(_policy())  # d_base 24
    with pytest.raises(solc.ArgumentError, match="trained for") as info:
        src.reset(ActionSpace(["mlp"]), 1, torch.ones(3), 4)
    assert info.value.argument == "policy"
    src.reset(ActionSpace(), 1, torch.ones(3), 4)
    h = torch.zeros(1, D_BASE + 8)
    with pytest.raises(solc.ArgumentError, match=f"hidden size {D_BASE}, not {D_BASE + 8}") as info:
        src.next_actions(0, h, h, torch.zeros(1, dtype=torch.bool))
    assert info.value.argument == "policy"
