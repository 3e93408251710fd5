"""`python tools/plan.py` = `megamoe-plan`: the command is megamoe/cli/plan.py (`--help` says what it does)."""
import sys

from megamoe.cli.plan import main

if __name__ == "__main__":
    sys.exit(main())
