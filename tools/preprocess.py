"""`python tools/preprocess.py` = `megamoe-preprocess`: the command is megamoe/cli/preprocess.py (`--help` says what it does)."""
import sys

from megamoe.cli.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
