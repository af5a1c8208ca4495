"""The quick policy-vs-baselines comparison runs the baselines at the policy's realized budgets."""
import torch

from runtime.policy import PolicyConfig, PolicyNet
from training.compare_baselines import _table, compare


def test_compare_matches_baselines_to_the_policys_realized_budget(tiny_sol):
    torch.manual_seed(0)
    policy = PolicyNet(PolicyConfig.for_model(tiny_sol, d_model=32))
    ctx = torch.randint(0, tiny_sol.token_embedding.shape[0], (3, 30), generator=torch.Generator().manual_seed(0))
    res = compare(tiny_sol, policy, ctx, 0.6, horizon=8, modes=("greedy", "sample"), samples=2, random_draws=2)
    for mode in ("greedy", "sample"):
        r = res[mode]
        for axis in ("attn", "mlp", "quant"):
            # Fixed/Random get each episode's realized budget as target: equal up to whole-step rounding
            assert abs(r["fixed"][f"{axis}_budget"] - r["policy"][f"{axis}_budget"]) <= 0.5 * 0.5 / 8 + 1e-9
            assert abs(r["random"][f"{axis}_budget"] - r["fixed"][f"{axis}_budget"]) < 1e-9
        assert r["policy"]["episodes"] == (3 if mode == "greedy" else 6)
        assert abs(r["policy_minus_fixed"]["mean"] - (r["policy"]["mean_loglik"] - r["fixed"]["mean_loglik"])) < 1e-6
    assert "policy - fixed" in _table(res)
