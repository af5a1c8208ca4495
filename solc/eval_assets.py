"""Fetch the multiple-choice benchmark data used by `python -m training.evaluate` (set-up time only).

    from solc.eval_assets import prepare_mc; prepare_mc()      # or: python -m solc.eval_assets [--force]

- BIG-bench: the PyPI sdist bigbench==1.0.0 (358 MB, `pip download --no-deps`, never installed); only
  the task.json files of BIGBENCH_TASKS are extracted (read with tarfile).
- MMLU-format questions: evals/registry/data/sandbagging/*.jsonl of the wheel evals==3.0.1.post1
  (`pip download --no-deps`, never installed; read with zipfile).

Both land in <cache>/data/mc (`mc_dir()`), with the same marker as the other assets
(solc/assets.py), so a second call only reads the marker. Nothing here runs at evaluation time:
training/mc.py reads the prepared folder and names this function when it is missing.
"""
from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

from solc.assets import Download, _ready, download, write_marker
from solc.cache import atomic_directory, cache_root

BIGBENCH_SDIST = Download(
    "bigbench==1.0.0", "bigbench-1.0.0.tar.gz",
    "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
)
EVALS_WHEEL = Download(
    "evals==3.0.1.post1", "evals-3.0.1.post1-py3-none-any.whl",
    "0abcb2051303500784b1641a6e4f6b813ed43ad64f879a37d344a6774eb8eb78",
)
# Top-level BIG-bench multiple-choice tasks with short prompts (candidates screened for SmolLM2-135M
# being above chance; see docs/results.md for which ones the evaluation uses by default).
BIGBENCH_TASKS = (
    "general_knowledge", "human_organs_senses", "emoji_movie", "empirical_judgments", "similarities_abstraction",
    "odd_one_out", "hindu_knowledge", "phrase_relatedness", "physical_intuition", "riddle_sense", "misconceptions",
    "known_unknowns", "common_morpheme", "date_understanding", "intent_recognition", "sports_understanding",
)
SANDBAGGING = "evals/registry/data/sandbagging/"


def mc_dir() -> Path:
    return cache_root() / "data" / "mc"


def prepare_mc(force: bool = False) -> Path:
    """Download both archives (if not cached) and extract the task files into `mc_dir()`."""
    out = mc_dir()
    if not force and _ready(out):
        return out
    sdist, wheel = download(BIGBENCH_SDIST), download(EVALS_WHEEL)
    with atomic_directory(out) as tmp:
        (tmp / "bigbench").mkdir()
        wanted = {f"bigbench-1.0.0/bigbench/benchmark_tasks/{t}/task.json": t for t in BIGBENCH_TASKS}
        with tarfile.open(sdist) as tar:
            for member in tar:  # streamed: the sdist is read once, front to back
                task = wanted.pop(member.name, None)
                if task is not None:
                    data = tar.extractfile(member).read()
                    json.loads(data)  # fail here, not at evaluation time
                    (tmp / "bigbench" / f"{task}.json").write_bytes(data)
        if wanted:
            raise FileNotFoundError(f"{sdist.name} lacks {sorted(wanted.values())}")
        (tmp / "mmlu").mkdir()
        with zipfile.ZipFile(wheel) as z:
            names = [n for n in z.namelist() if n.startswith(SANDBAGGING) and n.endswith(".jsonl")]
            if not names:
                raise FileNotFoundError(f"{wheel.name} holds no {SANDBAGGING}*.jsonl")
            for n in names:
                (tmp / "mmlu" / Path(n).name).write_bytes(z.read(n))
        write_marker(tmp, BIGBENCH_SDIST.sha256 + "+" + EVALS_WHEEL.sha256)
    print(f"solc: multiple-choice data ready in {out}", flush=True)
    return out


REBUILD_MC_HINT = "rebuild with `python -m solc.eval_assets --force`"


def main(argv=None) -> None:
    import argparse
    import sys

    from runtime.errors import AssetError

    parser = argparse.ArgumentParser(prog="python -m solc.eval_assets", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true",
                        help="rebuild the prepared folder (downloads are reused when their sha256 matches)")
    args = parser.parse_args(argv)
    try:
        prepare_mc(force=args.force)
    except (AssetError, FileNotFoundError) as e:
        sys.exit(f"solc.eval_assets: {e}")
    except OSError as e:  # a read-only or full cache: say where, not a traceback
        sys.exit(f"solc.eval_assets: cannot write the asset cache {cache_root()} ({e.strerror or e}"
                 f"{': ' + str(e.filename) if e.filename else ''}); make it writable or set SOLC_CACHE to a writable folder")


if __name__ == "__main__":
    main()
