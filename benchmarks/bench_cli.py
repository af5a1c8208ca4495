"""What the benchmark scripts share as command-line tools (torch-free, like training/startup.py):

  check_outputs  before measuring, the --out folder and the result files a run would write over: absent,
                 or earlier results of the same script (solc.cache.check_replaceable_result for a JSON, the
                 leading comment lines for a CSV); anything else is the user's, refused and left as it is.
  run            a script's main, as the training CLIs end: Ctrl-C ends it with one line saying what was
                 kept (exit 130), an argument solc refuses (an ArgumentError, e.g. a foreign --out) with
                 one line naming it (exit 2), not a traceback.
"""
from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Callable


def _csv_command(path: Path) -> str:
    """The command a CSV's leading comment lines record ('# command: ...', or a first '# python ...'
    line, quoted or not); '' where it has none."""
    try:
        with open(path, newline="") as f:
            head = list(itertools.islice(f, 16))
    except (OSError, UnicodeDecodeError):
        return ""
    for line in head:
        line = line.strip().strip('"')
        if not line.startswith("#"):
            break
        text = line[1:].strip().removeprefix("command:").strip()
        if text.startswith("python "):
            return text
    return ""


def check_outputs(parser, out: Path, stem: str, script: str, suffixes=(".json", ".csv"),
                  argument: str = "--out/--tag") -> None:
    """Before measuring: `out` is a folder (or not there yet), and each out/stem+suffix is absent or an
    earlier result of benchmarks/`script`; a file of --out is parser.error, a foreign result an
    ArgumentError naming `argument`."""
    from runtime.errors import ArgumentError
    from solc.cache import check_replaceable_result

    out = Path(out)
    if Path(stem).name != stem or stem in (".", ".."):  # a --tag holding a path would write outside --out
        raise ArgumentError("--tag", f"--tag makes the result name {stem!r}, which is not a plain file name: use a "
                                     "tag without '/'")
    if os.path.lexists(out) and not out.is_dir():
        parser.error(f"--out={str(out)!r} is invalid: expected a folder (the results are written into it)")
    command = f"python benchmarks/{script}"
    for suffix in suffixes:
        path = out / f"{stem}{suffix}"  # not with_suffix: a tag may hold a dot
        if suffix == ".json":
            check_replaceable_result(path, command, argument)
        elif os.path.lexists(path) and not _csv_command(path).startswith(command):
            raise ArgumentError(argument, f"{argument} {str(path)!r} exists and is not a result of `{command}`; "
                                          "it is left as it is: pass a new path")


WRITTEN: list[Path] = []  # the result files a script writes as it goes (its rows so far), once it has


def kept() -> str:
    """What an interrupted run leaves: the files WRITTEN says, marked incomplete, or nothing."""
    if not WRITTEN:
        return "nothing was written"
    return (f"the results measured so far are in {' and '.join(str(p) for p in WRITTEN)} "
            '(marked "complete": false)')


def run(main: Callable[[], int | None], tool: str) -> int:
    """main()'s exit status; Ctrl-C: one line saying what was kept and 130; a solc error (ArgumentError,
    AssetError): one line and 2."""
    from runtime.errors import SolcError
    from training.startup import ctrl_c_raises

    ctrl_c_raises()  # torch has loaded: Ctrl-C is a KeyboardInterrupt
    try:
        status = main()
        return status if isinstance(status, int) else 0  # the A/B scripts' main returns its result
    except KeyboardInterrupt:
        print(f"\n{tool}: interrupted; {kept()}", file=sys.stderr)
        return 130
    except SolcError as e:
        print(f"{tool}: error: {e}", file=sys.stderr)
        return 2
