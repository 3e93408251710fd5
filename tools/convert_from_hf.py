"""`python tools/convert_from_hf.py` = `megamoe-convert-from-hf`: the command is megamoe/cli/convert_from_hf.py (`--help` says what it does)."""
import sys

from megamoe.cli.convert_from_hf import main

if __name__ == "__main__":
    sys.exit(main())
