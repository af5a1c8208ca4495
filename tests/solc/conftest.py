"""Fixtures of the solc.data tests: the built-in tokenizer, and a private contexts cache."""
import pytest

import solc


@pytest.fixture(scope="module")
def tokenizer():
    return solc.load_tokenizer()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """A fresh contexts cache over the real model and corpus assets (never written through)."""
    real_root = solc.cache.cache_root()
    root = tmp_path / "cache"
    root.mkdir()
    for name in ("data", "models"):
        (root / name).symlink_to(real_root / name)
    monkeypatch.setenv("SOLC_CACHE", str(root))
    return root
