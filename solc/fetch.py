"""python -m solc.fetch [--force | --verify]: fetch and prepare the built-in model and corpus, or check
them (see solc.assets). Problems are one line on stderr and exit status 1, never a traceback."""
import argparse
import sys

from runtime.errors import AssetError
from solc import assets
from solc.cache import cache_root


def verify() -> int:
    """Full sha256 check of every prepared asset against its marker; 0 when all are intact."""
    checked, problems, fixes = assets.verify_all()
    for problem in problems:
        print(f"solc.fetch --verify: {problem}", file=sys.stderr)
    if problems:
        print(f"solc.fetch --verify: {len(problems)} damaged or missing; {'; '.join(fixes)}", file=sys.stderr)
        return 1
    print(f"solc: assets intact ({', '.join(map(str, checked))})")
    return 0


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m solc.fetch", description=assets.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    what = parser.add_mutually_exclusive_group()
    what.add_argument("--force", action="store_true", help="rebuild the prepared directories (downloads are reused when their sha256 matches)")
    what.add_argument("--verify", action="store_true", help="check every prepared file's sha256 against its marker; exit 1 naming the damaged ones")
    args = parser.parse_args(argv)
    try:
        if args.verify:
            sys.exit(verify())
        assets.fetch(force=args.force)
    except AssetError as e:
        sys.exit(f"solc.fetch: {e}")
    except OSError as e:  # a read-only or full cache: say where, not a traceback
        sys.exit(f"solc.fetch: cannot write the asset cache {cache_root()} ({e.strerror or e}"
                 f"{': ' + str(e.filename) if e.filename else ''}); make it writable or set SOLC_CACHE to a writable folder")


if __name__ == "__main__":
    main()
