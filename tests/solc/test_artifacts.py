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


def _logits_at_actions(sol, ids):
    """Logits under three uniform actions (cheapest, a middle one, dense) and a per-token mix."""
    n = len(sol.space)
    mixed = torch.randint(0, n, ids.shape, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        return [sol(ids, torch.full_like(ids, a)).logits for a in (0, n // 2, n - 1)] + [sol(ids, mixed).logits]


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("name", ["tiny-qwen3", "tiny-llama"])
def test_half_precision_round_trip_is_bit_identical(name, dtype, tmp_path):
    sol = solc.compile(solc.load_model(name, dtype=dtype), max_seq_len=64)
    sol2, _, _ = solc.load(solc.export(sol, None, tmp_path / "art", programs=False))
    ids = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(1))
    before, after = _logits_at_actions(sol, ids), _logits_at_actions(sol2, ids)
    assert before[0].dtype == getattr(torch, dtype)
    assert all(torch.equal(b, a) for b, a in zip(before, after))


def test_cast_rotary_buffers_survive_the_round_trip(tmp_path):
    """model.to(bfloat16) casts the non-persistent inv_freq too; save_pretrained does not store it and
    from_pretrained recomputes it in fp32, so the artifact keeps it (buffers.safetensors)."""
    model = solc.load_model("tiny-llama").to(torch.bfloat16)
    sol = solc.compile(model, max_seq_len=256)
    path = solc.export(sol, None, tmp_path / "art", programs=False)
    manifest = json.loads((path / "manifest.json").read_text())
    assert manifest["buffers"] == {"file": "buffers.safetensors"} and "buffers.safetensors" in manifest["files"]
    sol2, _, _ = solc.load(path)
    assert sol2.base_model.model.rotary_emb.inv_freq.dtype == torch.bfloat16
    ids = torch.randint(0, 256, (1, 200), generator=torch.Generator().manual_seed(0))  # late positions: angles differ most
    assert all(torch.equal(b, a) for b, a in zip(_logits_at_actions(sol, ids), _logits_at_actions(sol2, ids)))


def test_buffers_that_do_not_fit_the_model_are_named(exported, tmp_path):
    from safetensors.torch import save_file

    dst = _copy(exported[2], tmp_path)
    save_file({"model.rotary_emb.inv_freq": torch.zeros(3)}, dst / "buffers.safetensors")
    _rewrite_manifest(dst, lambda m: m["files"].update({"buffers.safetensors": {
        "sha256": artifacts.sha256_file(dst / "buffers.safetensors"), "bytes": (dst / "buffers.safetensors").stat().st_size}}))
    with pytest.raises(solc.AssetError, match=r"buffers\.safetensors: buffer .*inv_freq: shape \(3,\)"):
        solc.load(dst)


def _tiny_tokenizer():
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "to": 1, "be": 2}
    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="[UNK]")),
                                   unk_token="[UNK]")


@pytest.fixture(scope="module")
def with_tokenizer(exported, tmp_path_factory):
    sol = exported[0]
    return solc.export(sol, None, tmp_path_factory.mktemp("tok") / "art", tokenizer=_tiny_tokenizer(), programs=False)


def test_listed_tokenizer_is_loaded(with_tokenizer):
    files = json.loads((with_tokenizer / "manifest.json").read_text())["files"]
    assert any(f.startswith("tokenizer/") for f in files)
    _, _, tokenizer = solc.load(with_tokenizer)
    assert tokenizer is not None and tokenizer.convert_tokens_to_ids(["to", "be"]) == [1, 2]


def test_tokenizer_the_manifest_does_not_list_is_refused(exported, tmp_path):
    dst = _copy(exported[2], tmp_path)
    _tiny_tokenizer().save_pretrained(dst / "tokenizer")
    with pytest.raises(solc.AssetError, match=r"copy/tokenizer: manifest\.json lists no file in it.*added after export"):
        solc.load(dst)


def test_unlisted_files_beside_listed_ones_are_refused(with_tokenizer, tmp_path):
    dst = _copy(with_tokenizer, tmp_path)
    (dst / "tokenizer" / "added_tokens.json").write_text('{"x": 3}')
    with pytest.raises(solc.AssetError, match=r"copy/tokenizer: holds entries .*tokenizer/added_tokens\.json"):
        solc.load(dst)
    (dst / "tokenizer" / "added_tokens.json").unlink()
    (dst / "model" / "model.safetensors.index.json").write_text("{}")  # from_pretrained would read it
    with pytest.raises(solc.AssetError, match=r"copy/model: holds entries .*model/model\.safetensors\.index\.json"):
        solc.load(dst)


def test_policy_config_without_a_listed_policy_file_is_refused(exported, tmp_path):
    dst = _copy(exported[2], tmp_path)
    _rewrite_manifest(dst, lambda m: m["files"].pop("policy.safetensors"))
    with pytest.raises(solc.AssetError, match=r"does not list policy\.safetensors"):
        solc.load(dst)


def test_meta_device_is_refused_at_the_boundary(exported):
    with pytest.raises(solc.ArgumentError, match=r"device='meta' is invalid: load needs the weights on a real device") as err:
        solc.load(exported[2], device="meta")
    assert err.value.argument == "device"


@pytest.mark.parametrize("copies", [["a"], "x", {"sha256": ["a"]}, {"sha256": {"w": 3}}])
def test_malformed_mlp_copies_is_an_asset_error(exported, tmp_path, copies):
    dst = _copy(exported[2], tmp_path)
    _rewrite_manifest(dst, lambda m: m.__setitem__("mlp_copies", copies))
    with pytest.raises(solc.AssetError, match=r"manifest\.json: field 'mlp_copies' is invalid .*re-export"):
        solc.load(dst)


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.__setitem__("dtype", "int64"), r"field 'dtype' is invalid \('int64' is not a floating-point torch dtype\)"),
    (lambda m: m["files"].__setitem__("../outside.txt", {"sha256": "0", "bytes": 1}), r"lists '\.\./outside\.txt', a path outside"),
])
def test_other_malformed_manifest_fields_are_asset_errors(exported, tmp_path, edit, message):
    dst = _copy(exported[2], tmp_path)
    _rewrite_manifest(dst, edit)
    with pytest.raises(solc.AssetError, match=message):
        solc.load(dst)
