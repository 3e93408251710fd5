"""`python tools/evaluate.py` = `megamoe-evaluate`: the command is megamoe/cli/evaluate.py (`--help` says what it does)."""
import sys

from megamoe.cli.evaluate import main

if __name__ == "__main__":
    sys.exit(main())
