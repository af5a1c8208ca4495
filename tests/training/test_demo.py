"""training.demo (`make demo`) replaces OUT/grpo and OUT/artifact on every run: it must never do that
in a folder that holds anything it did not write."""
import pytest

from training import demo


def _never_load(*args, **kwargs):
    raise AssertionError("the model loaded before --out was checked")


def test_demo_refuses_a_folder_holding_a_users_run_before_loading(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_compiled", _never_load)
    runs = tmp_path / "runs"
    (runs / "grpo").mkdir(parents=True)
    (runs / "grpo" / "checkpoint.pt").write_bytes(b"a 17-minute training run")
    with pytest.raises(SystemExit) as done:
        demo.main(["--out", str(runs)])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert f"--out {runs} already holds files the demo did not write (grpo)" in err and "Traceback" not in err
    assert (runs / "grpo" / "checkpoint.pt").read_bytes() == b"a 17-minute training run"
    assert not (runs / demo.DEMO_MARK).exists()


def test_demo_takes_a_new_empty_or_its_own_folder(tmp_path):
    new, empty, own = tmp_path / "new", tmp_path / "empty", tmp_path / "own"
    empty.mkdir()
    demo.claim_out(own)
    (own / "grpo").mkdir()  # what the demo's own earlier run left
    for out in (new, empty, own):
        demo.claim_out(out)
        assert (out / demo.DEMO_MARK).is_file()


def test_demo_refuses_a_file_as_out(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "load_compiled", _never_load)
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    with pytest.raises(SystemExit) as done:
        demo.main(["--out", str(file)])
    assert done.value.code == 2 and f"--out {file} is a file" in capsys.readouterr().err
    assert file.read_text() == "mine"
