"""solc.export / solc.load: round trip, integrity checks, the exported program."""
import json
import shutil

import pytest
import torch

import solc
from solc import artifacts
from runtime.policy import PolicyConfig, PolicyNet, PolicySource


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    torch.manual_seed(0)
    sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=48)
    solc.calibrate_costs(sol, context=16, repeats=2, warmup=1)
    solc.calibrate_cost_model(sol, contexts=(16, 32), rounds=2, warmup=1)
    policy = PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=4, scalar_hidden=16)).eval()
    path = solc.export(sol, policy, tmp_path_factory.mktemp("art") / "tiny-sol")
    return sol, policy, path


def _generate(sol, policy):
    """Greedy tokens; the (untrained, near-uniform) policy samples its actions from `seed`, so the
    schedule varies and must still come out identical after the round trip."""
    prompt = torch.randint(0, 256, (2, 10), generator=torch.Generator().manual_seed(3))
    return sol.generate(prompt, policy=PolicySource(policy), budget=0.6, max_new_tokens=16, seed=11)


def test_round_trip_gives_identical_tokens_and_actions(exported):
    sol, policy, path = exported
    before = _generate(sol, policy)
    sol2, policy2, tokenizer = solc.load(path)
    after = _generate(sol2, policy2)
    assert torch.equal(before.tokens, after.tokens)
    assert torch.equal(before.actions, after.actions)
    assert len(set(before.actions[before.controlled].tolist())) > 1  # the policy really chose
    assert sol2.cost_table == sol.cost_table
    assert sol2.cost_model == sol.cost_model and sol2.cost_model.contexts == [16, 32]
    assert sol2.space == sol.space and tokenizer is None


def test_manifest_records_versions_grid_and_files(exported):
    sol, policy, path = exported
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["format"] == "solc-artifact" and manifest["format_version"] == 2
    assert set(manifest["versions"]) == {"solc", "torch", "transformers"}
    assert manifest["versions"]["torch"].startswith("2.13")
    assert manifest["space"] == sol.space.to_dict()
    assert manifest["dtype"] == "float32" and manifest["max_seq_len"] == 48
    assert manifest["policy"] == policy.config.to_dict()
    assert manifest["cost_model"] == sol.cost_model.to_dict() and manifest["cost_model"]["kind"] == "measured"
    assert {"policy.safetensors", "programs/step.pt2"} <= set(manifest["files"])
    assert any(name.startswith("model/") and name.endswith(".safetensors") for name in manifest["files"])


def _copy(path, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(path, dst)
    return dst


def test_corrupt_file_is_named(exported, tmp_path):
    dst = _copy(exported[2], tmp_path)
    weights = dst / "policy.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    with pytest.raises(solc.AssetError, match=r"policy\.safetensors: corrupt"):
        solc.load(dst)


def test_missing_file_is_named(exported, tmp_path):
    dst = _copy(exported[2], tmp_path)
    (dst / "policy.safetensors").unlink()
    with pytest.raises(solc.AssetError, match=r"policy\.safetensors: missing"):
        solc.load(dst)


def _rewrite_manifest(dst, edit):
    """Edit the manifest and re-seal it, as an export by another version would have written it."""
    manifest = json.loads((dst / "manifest.json").read_text())
    edit(manifest)
    artifacts.write_manifest(dst, manifest)


def test_version_mismatch_is_named(exported, tmp_path):
    dst = _copy(exported[2], tmp_path)
    _rewrite_manifest(dst, lambda m: m["versions"].update(torch="1.0.0"))
    with pytest.raises(solc.AssetError, match=r"manifest\.json: written with torch 1\.0\.0"):
        solc.load(dst)
    solc.load(dst, check_versions=False)  # an explicit override still loads


def test_not_an_artifact(tmp_path):
    with pytest.raises(solc.AssetError, match="manifest.json: missing"):
        solc.load(tmp_path)


def test_exported_program_reproduces_the_runtime(exported):
    sol, _, path = exported
    program = solc.load_program(path, sol=sol).module()
    ids = torch.randint(0, 256, (3, 12), generator=torch.Generator().manual_seed(5))
    actions = torch.randint(0, len(sol.space), (3, 12), generator=torch.Generator().manual_seed(6))
    pos = torch.arange(12).expand(3, 12)
    cache = sol.new_cache(3, 12)
    logits, _ = program(ids, pos, actions, *cache.tensors)
    with torch.no_grad():
        expected = sol(ids, actions).logits
    torch.testing.assert_close(logits, expected, atol=1e-5, rtol=0)


def test_manifest_records_the_quant_mode_and_the_copies_to_recompute(exported):
    sol, _, path = exported
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["space"]["quant"] == "weight"
    copies = manifest["mlp_copies"]
    assert copies["storage"] == "recompute" and copies["bytes"] == sol.info["mlp_copies_bytes"]
    names = set(copies["sha256"])
    assert any(n.endswith("__in8") for n in names) and any(n.endswith("__in4_cpu") for n in names)
    assert not any("solc_mlp_copy" in f for f in manifest["files"])  # not stored as files
    sol2, _, _ = solc.load(path)
    for name, tensor in sol.graph.named_buffers():
        if name.startswith("solc_mlp_copy"):
            assert torch.equal(sol2.graph.get_buffer(name), tensor)


def test_copies_that_recompute_differently_are_named(exported, tmp_path):
    _, _, path = exported
    dst = _copy(path, tmp_path)
    name = sorted(json.loads((dst / "manifest.json").read_text())["mlp_copies"]["sha256"])[0]
    _rewrite_manifest(dst, lambda m: m["mlp_copies"]["sha256"].__setitem__(name, "0" * 64))
    with pytest.raises(solc.AssetError,
                       match=rf"recomputed on load differ from the exported ones \(1 of \d+, e.g. {name}\)"):
        solc.load(dst)
