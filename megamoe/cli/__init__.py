"""The command-line tools: `python tools/X.py` and the `megamoe-X` console scripts run main() here."""
from __future__ import annotations

import argparse
import sys


def add_device_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="auto", help="auto (a GPU when present), cpu, cuda or cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="weights and compute dtype (auto: bfloat16 on a GPU, float32 on the CPU)")


def add_trust_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--trust-checkpoint", action="store_true",
                        help="load checkpoint files that name classes beyond DeepSpeed's checkpoint classes "
                             "(unpickling can run code; see megamoe/checkpoint/pickles.py)")


class report_errors:
    """`with report_errors("tool", SomeError, ...) as failed:` runs the body; an expected error
    (bad input the message already explains) is printed as `tool: error: ...` and swallowed, and
    `failed` becomes true with `failed.code` the exit status to return. Other errors propagate."""

    def __init__(self, tool: str, *errors: type[BaseException], code: int = 1):
        self.tool, self.errors, self.code, self.failed = tool, errors, code, False

    def __enter__(self) -> "report_errors":
        return self

    def __exit__(self, kind, error, tb) -> bool:
        if kind is None or not issubclass(kind, self.errors):
            return False
        print(f"{self.tool}: error: {error}", file=sys.stderr)
        self.failed = True
        return True

    def __bool__(self) -> bool:
        return self.failed
