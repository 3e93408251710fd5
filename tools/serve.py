"""`python tools/serve.py` = `megamoe-serve`: the command is megamoe/cli/serve.py (`--help` says what it does)."""
import sys

from megamoe.cli.serve import main

if __name__ == "__main__":
    sys.exit(main())
