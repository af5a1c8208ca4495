"""solc.export never loses data: it refuses foreign directories, replaces artifacts atomically, survives
kill -9 at any point, stores each weight once and seals its manifest."""
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import solc
from runtime.errors import ArgumentError
from runtime.policy import PolicyConfig, PolicyNet
from solc import artifacts, cache

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def sol():
    return solc.compile(solc.load_model("tiny-llama"), max_seq_len=32)


def _policy(sol, seed):
    torch.manual_seed(seed)
    return PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=4, scalar_hidden=16)).eval()


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def _tree(path):
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def test_foreign_directory_is_kept_and_refused(sol, tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "thesis.txt").write_text("three years of work")
    with pytest.raises(ArgumentError, match=r"mine.*not a solc artifact") as err:
        solc.export(sol, None, target, programs=False)
    assert err.value.argument == "path"
    assert (target / "thesis.txt").read_text() == "three years of work"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no temporary left behind


def test_current_directory_and_files_are_refused(sol, tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("keep")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ArgumentError, match="current directory"):
        solc.export(sol, None, ".", programs=False)
    with pytest.raises(ArgumentError, match="not a directory"):
        solc.export(sol, None, "notes.txt", programs=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]
    assert (tmp_path / "notes.txt").read_text() == "keep"


def test_user_file_inside_an_artifact_is_not_deleted(sol, tmp_path):
    path = solc.export(sol, None, tmp_path / "art", programs=False)
    (path / "README-mine.md").write_text("my notes")
    before = _tree(path)
    with pytest.raises(ArgumentError, match=r"README-mine\.md"):
        solc.export(sol, _policy(sol, 1), path, programs=False)
    assert _tree(path) == before


@pytest.mark.parametrize("link_to", ["dir", "file"])
def test_symlink_inside_an_artifact_is_refused_and_kept(sol, tmp_path, link_to):
    """A link the user put inside an artifact (to their own data) is not export's: rmtree of the old
    artifact would delete it."""
    path = solc.export(sol, None, tmp_path / "art", programs=False)
    mine = tmp_path / "mydata"
    mine.mkdir()
    (mine / "x.txt").write_text("x")
    target = mine if link_to == "dir" else mine / "x.txt"
    os.symlink(target, path / "model" / "data")
    before = _tree(path)
    with pytest.raises(ArgumentError, match=r"art'.*model/data \(a symbolic link\)") as err:
        solc.export(sol, None, path, programs=False)
    assert err.value.argument == "path"
    assert os.readlink(path / "model" / "data") == str(target) and (mine / "x.txt").read_text() == "x"
    assert _tree(path) == before


def test_empty_directory_and_fifo_inside_an_artifact_are_refused(sol, tmp_path):
    path = solc.export(sol, None, tmp_path / "art", programs=False)
    (path / "model" / "mine").mkdir()
    with pytest.raises(ArgumentError, match=r"model/mine/ \(an empty directory\)"):
        solc.export(sol, None, path, programs=False)
    (path / "model" / "mine").rmdir()
    os.mkfifo(path / "pipe")
    with pytest.raises(ArgumentError, match=r"pipe \(not a regular file\)"):
        solc.export(sol, None, path, programs=False)
    assert (path / "pipe").exists()


def test_symlink_to_an_artifact_is_refused_as_a_link(sol, tmp_path):
    path = solc.export(sol, None, tmp_path / "art", programs=False)
    link = tmp_path / "link"
    link.symlink_to(path)
    with pytest.raises(ArgumentError, match=r"link' is a symbolic link \(to '.*art'\).*never a link") as err:
        solc.export(sol, None, link, programs=False)
    assert err.value.argument == "path" and "not a directory" not in str(err.value)
    assert link.is_symlink() and (path / "manifest.json").is_file()


def test_parent_that_is_a_file_is_refused(sol, tmp_path):
    (tmp_path / "file.bin").write_text("data")
    with pytest.raises(ArgumentError, match=r"file\.bin/sub/deeper'.*inside '.*file\.bin', which is not a directory") as err:
        solc.export(sol, None, tmp_path / "file.bin" / "sub" / "deeper", programs=False)
    assert err.value.argument == "path"
    assert (tmp_path / "file.bin").read_text() == "data"


def test_replacing_an_artifact_swaps_it_whole(sol, tmp_path):
    first, second = _policy(sol, 1), _policy(sol, 2)
    path = solc.export(sol, first, tmp_path / "art", programs=False)
    solc.export(sol, second, path, programs=False)
    _, loaded, _ = solc.load(path)
    assert _same_weights(loaded, second) and not _same_weights(loaded, first)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    solc.export(sol, None, path, programs=False)  # a smaller artifact: the old policy file must go too
    assert not (path / "policy.safetensors").exists()


def test_fallback_swap_and_its_crash_recovery(sol, tmp_path, monkeypatch):
    """Without renameat2(RENAME_EXCHANGE): old moved aside, new renamed in. A crash between the two
    renames leaves only `.<name>.solc-old`; the next load or export moves it back."""
    first = _policy(sol, 1)
    path = solc.export(sol, first, tmp_path / "art", programs=False)
    real_rename = os.rename
    calls = []

    def crash_on_second(src, dst):
        calls.append((src, dst))
        if len(calls) == 2:
            raise KeyboardInterrupt("simulated crash between the renames")
        return real_rename(src, dst)

    monkeypatch.setattr(cache, "_exchange", lambda a, b: False)
    monkeypatch.setattr(cache.os, "rename", crash_on_second)
    with pytest.raises(KeyboardInterrupt):
        solc.export(sol, _policy(sol, 2), path, programs=False)
    monkeypatch.setattr(cache.os, "rename", real_rename)
    assert not path.exists() and cache.old_sibling(path).is_dir()
    _, loaded, _ = solc.load(path)  # recovers the old artifact
    assert _same_weights(loaded, first) and not cache.old_sibling(path).exists()
    solc.export(sol, _policy(sol, 2), path, programs=False)  # the fallback path end to end
    assert _same_weights(solc.load(path)[1], _policy(sol, 2))


def test_artifact_directories_have_the_usual_mode(sol, tmp_path):
    umask = os.umask(0o022)
    try:
        path = solc.export(sol, None, tmp_path / "art", programs=False)
    finally:
        os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "model").stat().st_mode) == 0o755
    assert stat.S_IMODE((path / "manifest.json").stat().st_mode) == 0o644


def _reseal(path, edit):
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest)
    artifacts.write_manifest(path, manifest)


@pytest.fixture(scope="module")
def artifact(sol, tmp_path_factory):
    return solc.export(sol, _policy(sol, 1), tmp_path_factory.mktemp("a") / "art")


def test_edited_grid_fails_to_load(artifact, tmp_path):
    dst = shutil.copytree(artifact, tmp_path / "copy")
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["space"]["levels"]["attn"] = [0.2, 0.6, 1.0]
    (dst / "manifest.json").write_text(json.dumps(manifest, indent=2))
    with pytest.raises(solc.AssetError, match=r"manifest\.json: its sha256 differs from manifest\.sha256.*edited"):
        solc.load(dst)
    (dst / "manifest.sha256").unlink()
    with pytest.raises(solc.AssetError, match=r"manifest\.sha256: missing"):
        solc.load(dst)


@pytest.mark.parametrize("key", artifacts.REQUIRED_KEYS[2:])
def test_missing_manifest_key_is_named(artifact, tmp_path, key):
    dst = shutil.copytree(artifact, tmp_path / "copy")
    _reseal(dst, lambda m: m.pop(key))
    with pytest.raises(solc.AssetError, match=f"lacks the keys \\['{key}'\\]"):
        solc.load(dst)


def test_program_stores_no_weights_and_reproduces_the_runtime(sol, artifact):
    import runtime.ops.library  # noqa: F401

    bare = torch.export.load(artifact / "programs" / "step.pt2")
    stored = {**bare.state_dict, **{k: v for k, v in bare.constants.items() if isinstance(v, torch.Tensor)}}
    assert stored and all(t.numel() == 0 for t in stored.values())  # every tensor is a placeholder
    manifest = json.loads((artifact / "manifest.json").read_text())
    assert set(manifest["program"]["tensors"]) == set(stored)
    program = solc.load_program(artifact, sol=sol).module()
    ids = torch.randint(0, 256, (2, 9), generator=torch.Generator().manual_seed(1))
    actions = torch.randint(0, len(sol.space), (2, 9), generator=torch.Generator().manual_seed(2))
    cache_ = sol.new_cache(2, 9)
    logits, _ = program(ids, torch.arange(9).expand(2, 9), actions, *cache_.tensors)
    with torch.no_grad():
        torch.testing.assert_close(logits, sol(ids, actions).logits, atol=1e-5, rtol=0)


CHILD = """
import sys, torch, solc
from runtime.policy import PolicyConfig, PolicyNet
sol = solc.compile(solc.load_model("tiny-llama"), max_seq_len=32)
torch.manual_seed(2)
policy = PolicyNet(PolicyConfig.for_model(sol, d_model=32, n_heads=4, scalar_hidden=16)).eval()
print("ready", flush=True)
while True:
    solc.export(sol, policy, sys.argv[1])
    print("done", flush=True)
"""


def test_kill_9_at_random_points_leaves_old_or_new(sol, tmp_path):
    """A child re-exports (new policy) over an artifact (old policy) in a loop; it is killed with
    SIGKILL at random moments: during its first export (old or new may be there) or after it finished
    one (then only new). Every time the path must load, with a policy that may be there."""
    old, new = _policy(sol, 1), _policy(sol, 2)
    path = solc.export(sol, old, tmp_path / "art")
    start = time.perf_counter()
    solc.export(sol, old, path)
    one_export = time.perf_counter() - start
    rng = random.Random(0)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    interrupted = 0
    for trial in range(4):
        solc.export(sol, old, path)
        child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, env=env, cwd=REPO)
        assert child.stdout.readline().strip() == b"ready"
        after_one = trial % 2 == 1
        if after_one:
            assert child.stdout.readline().strip() == b"done"
        time.sleep(rng.uniform(0.0, 1.5 * one_export))
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        interrupted += any(cache.TMP_TAG in p.name for p in tmp_path.iterdir())  # killed mid-export
        _, loaded, _ = solc.load(path)
        if after_one:
            assert _same_weights(loaded, new), f"trial {trial}"
        else:
            assert _same_weights(loaded, old) or _same_weights(loaded, new), f"trial {trial}"
    solc.export(sol, old, path)  # removes the temporaries of the killed children
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]
    assert interrupted >= 1  # the kills did land inside exports


@pytest.mark.slow
def test_smollm2_artifact_size(tmp_path):
    """Each weight once: the 135M fp32 artifact (model, tokenizer, program) is <= 0.6 GB."""
    sol = solc.compile(solc.load_model("smollm2-135m"), max_seq_len=64)
    path = solc.export(sol, None, tmp_path / "smollm2", tokenizer=solc.load_tokenizer())
    size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    program = (path / "programs" / "step.pt2").stat().st_size
    assert size <= 0.6e9, size
    assert program < 20e6, program
