"""python -m solc.fetch [--force]: fetch and prepare the built-in model and corpus (see solc.assets)."""
import argparse

from solc import assets


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m solc.fetch", description=assets.__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="rebuild the prepared directories (downloads are reused when their sha256 matches)")
    assets.fetch(force=parser.parse_args(argv).force)


if __name__ == "__main__":
    main()
