"""`python tools/convert_checkpoint.py` = `megamoe-convert-checkpoint`: the command is megamoe/cli/convert_checkpoint.py (`--help` says what it does)."""
import sys

from megamoe.cli.convert_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
