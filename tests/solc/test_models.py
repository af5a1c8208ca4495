"""solc.load_model: built-in model from the cache, tiny models, errors that say how to fix things."""
import time

import pytest
import torch

import solc
from solc.models import TINY_MODELS


def test_builtin_model_is_a_llama_and_loads_fast():
    solc.load_model()  # warm the file cache
    start = time.time()
    model = solc.load_model("smollm2-135m")
    elapsed = time.time() - start
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (model.config.num_hidden_layers, model.config.hidden_size) == (30, 576)
    assert (model.config.num_attention_heads, model.config.num_key_value_heads) == (9, 3)
    assert not any(p.requires_grad for p in model.parameters())
    assert elapsed < 10, f"loading from the cache took {elapsed:.1f}s"


def test_builtin_model_predicts_real_text():
    """A real model: the held-out next-token loss on Shakespeare is far below uniform (ln 49152 = 10.8)."""
    model, tok = solc.load_model(), solc.load_tokenizer()
    ids = solc.data.get_contexts(tok, split="test", length=128, max_contexts=2)
    with torch.no_grad():
        loss = torch.nn.functional.cross_entropy(model(ids).logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())
    assert loss.exp() < 100


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_tiny_models_are_deterministic_per_seed(name):
    a, b, c = solc.load_model(name, seed=0), solc.load_model(name, seed=0), solc.load_model(name, seed=1)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        la, lb, lc = a(ids).logits, b(ids).logits, c(ids).logits
    assert torch.equal(la, lb)
    assert not torch.allclose(la, lc)
    assert la.std() > 1e-3  # not degenerate


def test_tiny_models_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    solc.load_model("tiny-llama")
    assert torch.equal(torch.rand(3), expected)


def test_dtype_and_device_arguments():
    assert solc.load_model("tiny-llama", dtype="bfloat16").lm_head.weight.dtype == torch.bfloat16
    assert solc.load_model("tiny-llama", dtype=torch.float64).lm_head.weight.dtype == torch.float64
    with pytest.raises(ValueError, match=r"dtype='int8'.*valid choices.*bfloat16"):
        solc.load_model("tiny-llama", dtype="int8")
    with pytest.raises(ValueError, match="device='gpu0'"):
        solc.load_model("tiny-llama", device="gpu0")


def test_unknown_name_lists_the_choices(tmp_path):
    with pytest.raises(solc.AssetError) as err:
        solc.load_model("llama-9000")
    msg = str(err.value)
    assert "'llama-9000'" in msg and "'smollm2-135m'" in msg and "'tiny-qwen3'" in msg and "config.json" in msg
    with pytest.raises(solc.AssetError, match="config.json"):
        solc.load_model(str(tmp_path))  # a folder without a model


def test_local_folder_round_trip(tmp_path):
    model = solc.load_model("tiny-qwen2")
    model.save_pretrained(tmp_path)
    again = solc.load_model(str(tmp_path))
    ids = torch.randint(0, 256, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


def test_tiny_models_have_no_tokenizer():
    with pytest.raises(solc.AssetError, match="no tokenizer"):
        solc.load_tokenizer("tiny-llama")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_tiny_models_keep_rotary_buffers_fp32_like_from_pretrained(dtype, tmp_path):
    """from_pretrained(dtype=...) computes inv_freq in fp32 and keeps it; a tiny model in that dtype
    must be the same model as its saved copy loaded back in that dtype."""
    model = solc.load_model("tiny-llama", dtype=dtype)
    assert model.lm_head.weight.dtype == dtype
    assert model.model.rotary_emb.inv_freq.dtype == torch.float32
    solc.load_model("tiny-llama").save_pretrained(tmp_path)
    again = solc.load_model(str(tmp_path), dtype=dtype)
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(model(ids).logits, again(ids).logits)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "tiny"
    solc.load_model("tiny-llama").save_pretrained(path)
    return path


def _broken(tmp_path, saved, weights: bytes | None, config: str | None = None):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "config.json").write_text(config if config is not None else (saved / "config.json").read_text())
    if weights is not None:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


@pytest.mark.parametrize("case, detail", [
    ("config only", "no file named model.safetensors"),
    ("garbage weights", "SafetensorError"),
    ("truncated weights", "SafetensorError"),
    ("invalid config.json", "config.json"),
])
def test_broken_local_folder_is_an_asset_error_naming_it(saved, tmp_path, case, detail):
    weights = (saved / "model.safetensors").read_bytes()
    folder = _broken(tmp_path, saved, weights={"config only": None, "garbage weights": b"garbage" * 10,
                                               "truncated weights": weights[: len(weights) // 2],
                                               "invalid config.json": weights}[case],
                     config="{not json" if case == "invalid config.json" else None)
    with pytest.raises(solc.AssetError) as err:
        solc.load_model(folder)
    msg = str(err.value)
    assert msg.startswith(f"{folder}: cannot load a model from this folder") and detail in msg
    assert "re-save or re-download it" in msg


def test_folder_without_a_tokenizer_is_an_asset_error_naming_it(saved):
    with pytest.raises(solc.AssetError, match=rf"^{saved}: cannot load a tokenizer from this folder .*tokenizer\.json"):
        solc.load_tokenizer(saved)


def test_a_folder_named_like_a_builtin_needs_an_explicit_path(tmp_path, monkeypatch):
    solc.load_model("tiny-llama", dtype="bfloat16").save_pretrained(tmp_path / "tiny-llama")
    monkeypatch.chdir(tmp_path)
    with pytest.warns(UserWarning, match=r"'tiny-llama' is a built-in model name and also a folder here.*'\./tiny-llama'"):
        assert solc.load_model("tiny-llama").lm_head.weight.dtype == torch.float32  # the built-in
    assert solc.load_model("./tiny-llama").lm_head.weight.dtype == torch.bfloat16  # the folder
    assert solc.load_model(tmp_path.joinpath("tiny-llama").relative_to(tmp_path)).lm_head.weight.dtype == torch.bfloat16
