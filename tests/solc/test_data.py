"""solc.data: deterministic document splits, no play in two splits, cached contexts."""
import json

import pytest
import torch

import solc
from solc import data


def test_splits_are_deterministic_disjoint_and_non_empty():
    a, b = data.split_documents(), data.split_documents()
    assert {s: [k for k, _ in docs] for s, docs in a.items()} == {s: [k for k, _ in docs] for s, docs in b.items()}
    keys = {s: {k for k, _ in docs} for s, docs in a.items()}
    assert all(keys[s] for s in data.SPLITS)
    assert not (keys["train"] & keys["test"] or keys["train"] & keys["validation"] or keys["test"] & keys["validation"])


def test_both_editions_of_a_play_share_a_key():
    assert data.play_key("hamlet_gut.txt") == data.play_key("hamlet_gut_f.txt") == "hamlet"
    assert data.play_key("loves_labours_lost_gut_f.txt") == data.play_key("loves_labour_lost_gut.txt")
    assert data.play_key("twelfe-night_gut_f.txt") == data.play_key("twelfth_night_gut.txt")
    docs, _ = data.documents()
    assert len(docs) == 77 and len({k for k, _ in docs}) == 42  # 35 plays come in two editions


def test_split_does_not_depend_on_listing_order():
    assert data.split_of("hamlet") == data.split_of("hamlet")
    counts = {s: 0 for s in data.SPLITS}
    for i in range(2000):
        counts[data.split_of(f"doc{i}")] += 1
    assert 150 < counts["test"] < 250 and 150 < counts["validation"] < 250


def test_contexts_are_cached_and_keyed_by_length(tokenizer, tmp_path, monkeypatch):
    real_root = solc.cache.cache_root()
    monkeypatch.setenv("SOLC_CACHE", str(tmp_path))
    (tmp_path / "data").symlink_to(real_root / "data")  # the corpus, not its contexts
    first = data.get_contexts(tokenizer, split="validation", length=64)
    files = list((tmp_path / "contexts").iterdir())
    assert len(files) == 1
    again = data.get_contexts(tokenizer, split="validation", length=64)
    assert torch.equal(first, again) and len(list((tmp_path / "contexts").iterdir())) == 1
    other = data.get_contexts(tokenizer, split="validation", length=32)
    assert other.shape[1] == 32 and len(list((tmp_path / "contexts").iterdir())) == 2
    assert torch.equal(other.flatten()[: 64 * 4], first.flatten()[: 64 * 4])  # same token stream
    assert data.get_contexts(tokenizer, split="validation", length=64, max_contexts=3).shape == (3, 64)


def test_local_files_as_corpus(tokenizer, tmp_path, monkeypatch):
    monkeypatch.setenv("SOLC_CACHE", str(tmp_path / "cache"))  # its contexts must not land in the real cache
    folder = tmp_path / "texts"
    folder.mkdir()
    for i in range(30):
        (folder / f"doc{i}.txt").write_text(f"Document number {i}. " * 40)
    rows = tmp_path / "rows.jsonl"
    rows.write_text("\n".join(json.dumps({"text": f"Row {i} says hello. " * 30}) for i in range(30)))
    for corpus in (str(folder), str(rows)):
        splits = data.split_documents(corpus)
        assert sum(len(v) for v in splits.values()) == 30
        ctx = data.get_contexts(tokenizer, corpus=corpus, split="train", length=16)
        assert ctx.dtype == torch.long and ctx.shape[1] == 16
    assert len(list((tmp_path / "cache" / "contexts").iterdir())) == 2


def test_an_edited_corpus_replaces_its_cached_contexts(tokenizer, tmp_path, monkeypatch):
    """One entry per slot (corpus, tokenizer, split, length): editing the corpus recomputes its contexts
    and removes the entry of the old text; other slots and other corpora keep theirs. Entries of the old
    naming scheme (the key alone) are removed, never read."""
    monkeypatch.setenv("SOLC_CACHE", str(tmp_path / "cache"))
    rows, other = tmp_path / "rows.jsonl", tmp_path / "other.jsonl"
    write = lambda path, word: path.write_text(  # noqa: E731
        "\n".join(json.dumps({"text": f"{word} row {i} says hello. " * 30}) for i in range(30)))
    write(rows, "First")
    write(other, "Other")
    cache = tmp_path / "cache" / "contexts"
    cache.mkdir(parents=True)
    stale = cache / ("ab" * 12 + ".pt")
    stale.write_bytes(b"old scheme")
    first = data.get_contexts(tokenizer, corpus=str(rows), split="train", length=16)
    data.get_contexts(tokenizer, corpus=str(rows), split="train", length=8)
    data.get_contexts(tokenizer, corpus=str(other), split="train", length=16)
    assert not stale.exists() and len(list(cache.iterdir())) == 3
    before = set(cache.iterdir())
    write(rows, "Second")
    second = data.get_contexts(tokenizer, corpus=str(rows), split="train", length=16)
    assert not torch.equal(first, second)
    after = set(cache.iterdir())
    assert len(after) == 3 and len(before - after) == 1 and len(after - before) == 1
    assert torch.equal(data.get_contexts(tokenizer, corpus=str(rows), split="train", length=16), second)


def test_bad_arguments(tokenizer, tmp_path):
    with pytest.raises(solc.ArgumentError, match=r"split='dev'.*\['train', 'validation', 'test'\]") as e:
        data.get_contexts(tokenizer, split="dev")
    assert e.value.argument == "split"
    with pytest.raises(solc.ArgumentError, match="length") as e:
        data.get_contexts(tokenizer, length=1)
    assert e.value.argument == "length"
    with pytest.raises(solc.ArgumentError, match="no such file") as e:
        data.get_contexts(tokenizer, corpus=str(tmp_path / "missing.txt"))
    assert e.value.argument == "corpus" and isinstance(e.value, ValueError)
