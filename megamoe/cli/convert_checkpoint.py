"""Convert a megamoe training checkpoint to DeepSpeed's universal format, so it can be resumed at
a different expert-parallel size, world size or ZeRO stage.

    python tools/convert_checkpoint.py --input runs/ckpt [--tag global_step1000] --output runs/ckpt_universal
    python -m megamoe.pretrain ... --load runs/ckpt_universal --expert-model-parallel-size 4

Adam(W) checkpoints only; see megamoe/checkpoint/universal.py for what is converted and why
Muon checkpoints are refused.
"""
from __future__ import annotations

import argparse
import sys

from megamoe.checkpoint import CheckpointError
from megamoe.checkpoint.universal import convert
from megamoe.cli import add_trust_flag, report_errors


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--input", required=True, help="the --save directory of the run")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the input's `latest`)")
    p.add_argument("--output", required=True, help="new directory; resume with --load OUTPUT")
    p.add_argument("--workers", type=int, default=1)
    add_trust_flag(p)
    a = p.parse_args(argv)
    with report_errors("convert_checkpoint", CheckpointError, code=2) as failed:
        dst = convert(a.input, a.output, a.tag, a.workers, trust=a.trust_checkpoint)
    if failed:
        return failed.code
    print(f"universal checkpoint: {dst}\nresume with: --load {a.output} (any --expert-model-parallel-size / "
          f"world size / ZeRO stage)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
