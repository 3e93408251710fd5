"""`python tools/inspect_data.py` = `megamoe-inspect-data`: the command is megamoe/cli/inspect_data.py (`--help` says what it does)."""
import sys

from megamoe.cli.inspect_data import main

if __name__ == "__main__":
    sys.exit(main())
