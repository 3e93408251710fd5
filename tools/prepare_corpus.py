"""`python tools/prepare_corpus.py` = `megamoe-prepare-corpus`: the command is megamoe/cli/prepare_corpus.py (`--help` says what it does)."""
import sys

from megamoe.cli.prepare_corpus import main

if __name__ == "__main__":
    sys.exit(main())
