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


def _saved_policy(tmp_path):
    from training.grpo import GRPOConfig, build_model

    sol = build_model(GRPOConfig(model="tiny-llama", corpus="random", context_length=32, horizon=4))
    torch.manual_seed(0)
    path = tmp_path / "policy.pt"
    PolicyNet(PolicyConfig.for_model(sol, d_model=32)).save(path)
    return path


def test_cli_writes_its_json_and_replaces_only_its_own(tmp_path, capsys):
    import json

    import pytest

    from training.compare_baselines import main

    policy, out = _saved_policy(tmp_path), tmp_path / "compare.json"
    args = ["--policy", str(policy), "--model", "tiny-llama", "--corpus", "random", "--contexts", "2",
            "--context-length", "32", "--horizon", "4", "--modes", "greedy", "--random-draws", "1", "--json", str(out)]
    assert main(args) == 0
    first = json.loads(out.read_text())
    assert first["command"] == "python -m training.compare_baselines " + " ".join(args)
    assert first["results"]["greedy"]["policy"]["episodes"] == 2 and "policy - fixed" in capsys.readouterr().out
    assert main(args) == 0  # an earlier result of the same tool is replaced
    assert json.loads(out.read_text())["results"] == first["results"]
    out.write_text('{"mine": 1}')
    with pytest.raises(SystemExit) as done:
        main(args)
    assert done.value.code == 2 and out.read_text() == '{"mine": 1}'
    assert "--json" in capsys.readouterr().err


def test_cli_refuses_bad_values_before_loading(tmp_path, capsys, monkeypatch):
    import pytest

    from training import compare_baselines, grpo

    monkeypatch.setattr(grpo, "build_model", lambda *a, **k: pytest.fail("the model loaded"))
    policy = tmp_path / "policy.pt"
    for extra, message in ((["--contexts", "0"], "--contexts=0 is invalid: an int >= 1"),
                           (["--budget", "0.6,x"], "--budget='0.6,x' is invalid"),
                           (["--budget", "0.6,0.6"], "--budget='0.6,0.6' is invalid"),
                           (["--modes", "greedy,fast"], "--modes='greedy,fast' is invalid"),
                           (["--temperature", "0"], "--temperature=0.0 is invalid"),
                           ([], f"policy file {policy} does not exist")):
        with pytest.raises(SystemExit) as done:
            compare_baselines.main(["--policy", str(policy), *extra])
        err = capsys.readouterr().err
        assert done.value.code == 2 and message in err and "Traceback" not in err
