"""`python tools/generate.py` = `megamoe-generate`: the command is megamoe/cli/generate.py (`--help` says what it does)."""
import sys

from megamoe.cli.generate import main

if __name__ == "__main__":
    sys.exit(main())
