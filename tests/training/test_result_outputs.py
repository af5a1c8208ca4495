"""training.uniform_ppl and training.quant_check write result files: they replace their own earlier
results and refuse anything else at the path, before the model loads (a refusal costs nothing)."""
from pathlib import Path

import pytest

import solc
from solc.cache import check_replaceable_result
from training import quant_check, uniform_ppl

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(solc, "load_model", lambda *a, **k: pytest.fail("the model loaded before the checks"))


def _refused(main, argv, capsys) -> str:
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and "Traceback" not in err
    return err


def test_uniform_ppl_refuses_a_doc_it_did_not_write(tmp_path, no_model, capsys):
    # the docstring used to suggest --out docs/uniform_actions, which holds both grids' tables and notes
    err = _refused(uniform_ppl.main, ["--quant", "activation", "--out", str(ROOT / "docs" / "uniform_actions")], capsys)
    assert "uniform_actions.md exists and is not a table this tool wrote" in err
    notes = tmp_path / "notes"
    notes.with_suffix(".csv").write_text("my,own,csv\n")
    err = _refused(uniform_ppl.main, ["--out", str(notes)], capsys)
    assert "notes.csv exists and is not a table this tool wrote" in err
    assert notes.with_suffix(".csv").read_text() == "my,own,csv\n"


def test_uniform_ppl_replaces_its_own_tables(tmp_path):
    uniform_ppl.check_own_outputs(ROOT / "docs" / "uniform_actions_weight")  # committed output of the tool
    out = tmp_path / "table"
    out.with_suffix(".csv").write_text(uniform_ppl.CSV_HEADER + "\n0.1,0.4,4,0.25,760.51,2020\n")
    uniform_ppl.check_own_outputs(out)


@pytest.mark.parametrize("argv, message", [
    (["--batch", "0"], "--batch=0 is invalid: an int >= 1"),
    (["--max-contexts", "0"], "--max-contexts=0 is invalid: an int >= 1"),
    (["--length", "8"], "--length=8 is invalid: an int >= 9"),
    (["--dense-prefix", "-1"], "--dense-prefix=-1 is invalid: an int >= 0"),
])
def test_uniform_ppl_bad_values(tmp_path, no_model, capsys, argv, message):
    assert message in _refused(uniform_ppl.main, argv + ["--out", str(tmp_path / "t")], capsys)


def test_quant_check_refuses_a_json_it_did_not_write(tmp_path, no_model, capsys):
    mine = tmp_path / "mine.json"
    mine.write_text('{"mine": 1}')
    err = _refused(quant_check.main, ["--out", str(mine)], capsys)
    assert "is not a result of `python -m training.quant_check`" in err and mine.read_text() == '{"mine": 1}'
    assert "--max-contexts=0 is invalid" in _refused(quant_check.main, ["--max-contexts", "0"], capsys)
    committed = ROOT / "docs" / "results" / "quant_check.json"  # its own earlier result: replaceable
    check_replaceable_result(committed, "python -m training.quant_check", "--out")
