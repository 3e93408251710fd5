"""`python tools/convert_to_hf.py` = `megamoe-convert-to-hf`: the command is megamoe/cli/convert_to_hf.py (`--help` says what it does)."""
import sys

from megamoe.cli.convert_to_hf import main

if __name__ == "__main__":
    sys.exit(main())
