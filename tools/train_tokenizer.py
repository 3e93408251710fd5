"""`python tools/train_tokenizer.py` = `megamoe-train-tokenizer`: the command is megamoe/cli/train_tokenizer.py (`--help` says what it does)."""
import sys

from megamoe.cli.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
