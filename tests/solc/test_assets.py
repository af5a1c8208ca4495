"""The asset cache: reuse without rework, corruption detected and named, atomic writes."""
import json
import re
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


def test_fetch_verify_names_same_size_corruption(cache_copy, capsys):
    from solc import fetch

    with pytest.raises(SystemExit) as done:
        fetch.main(["--verify"])
    assert done.value.code == 0 and "assets intact" in capsys.readouterr().out
    play = cache_copy / "data" / "shakespeare" / "hamlet_gut.txt"  # a copy (copytree), not a hard link
    damaged = bytearray(play.read_bytes())
    damaged[5000:5010] = b"XXXXXXXXXX"  # same size: the cheap check at read time cannot see it
    play.write_bytes(bytes(damaged))
    (cache_copy / "data" / "shakespeare" / "macbeth_gut.txt").unlink()
    with pytest.raises(SystemExit) as done:
        fetch.main(["--verify"])
    err = capsys.readouterr().err
    assert done.value.code == 1
    assert re.search(r"hamlet_gut.txt: corrupt", err) and re.search(r"macbeth_gut.txt: missing", err)
    assert "python -m solc.fetch --force" in err and "Traceback" not in err


def test_fetch_verify_names_the_fix_of_what_is_damaged(cache_copy, capsys):
    """Damaged multiple-choice data is rebuilt by solc.eval_assets, not by solc.fetch: the summary line
    names the fix of each damaged folder and no other."""
    from solc import eval_assets, fetch

    mc = eval_assets.mc_dir()
    (mc / "mmlu").mkdir(parents=True)
    (mc / "mmlu" / "questions.jsonl").write_text('{"q": 1}\n')
    assets.write_marker(mc, "test")
    (mc / "mmlu" / "questions.jsonl").write_text('{"q": 2}\n')
    with pytest.raises(SystemExit) as done:
        fetch.main(["--verify"])
    err = capsys.readouterr().err
    assert done.value.code == 1 and re.search(r"questions.jsonl: corrupt", err)
    summary = err.strip().splitlines()[-1]
    assert "python -m solc.eval_assets --force" in summary and "solc.fetch --force" not in summary


def test_eval_assets_cli_forces_a_rebuild_and_reports_failures_in_one_line(cache_copy, monkeypatch):
    from solc import eval_assets

    calls = []
    monkeypatch.setattr(eval_assets, "prepare_mc", lambda force=False: calls.append(force))
    eval_assets.main(["--force"])
    eval_assets.main([])
    assert calls == [True, False]

    def unreachable(force=False):
        raise assets.AssetError("could not download bigbench==1.0.0: no network")

    monkeypatch.setattr(eval_assets, "prepare_mc", unreachable)
    with pytest.raises(SystemExit) as done:
        eval_assets.main([])
    assert str(done.value.code) == "solc.eval_assets: could not download bigbench==1.0.0: no network"


def test_fetch_on_an_unwritable_cache_is_one_line(cache_copy, monkeypatch, capsys):
    from solc import fetch

    def refuse(force=False):
        raise PermissionError(13, "Permission denied", str(cache_copy / "data" / ".shakespeare.solc-tmp-1-ab"))

    monkeypatch.setattr(assets, "fetch", refuse)
    with pytest.raises(SystemExit) as done:
        fetch.main(["--force"])
    message = str(done.value.code)
    assert message.startswith("solc.fetch: cannot write the asset cache") and str(cache_copy) in message
    assert "Permission denied" in message and "SOLC_CACHE" in message and "\n" not in message


def test_fetch_force_and_verify_exclude_each_other(capsys):
    from solc import fetch

    with pytest.raises(SystemExit) as done:
        fetch.main(["--force", "--verify"])
    assert done.value.code == 2 and "not allowed with" in capsys.readouterr().err
