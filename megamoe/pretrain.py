"""Pretrain a DeepSeek-V3-style MoE LM with DeepSpeed: parse the flags, then `Trainer(args).train()`.

    deepspeed --num_gpus 8 megamoe/pretrain.py --deepspeed ds_configs/zero2.json \\
        --model-config small-moe --data-path 0.7 data/a_text 0.3 data/b_text --tokenizer tok.model \\
        --seq-length 4096 --train-iters 10000 --lr 3e-4 --min-lr 3e-5 --lr-warmup-iters 500 \\
        --lr-decay-style cosine --expert-model-parallel-size 8 --save ckpt --load ckpt \\
        --save-interval 500 --eval-interval 500 --eval-iters 20 --tensorboard-dir tb --log-interval 10

The loop lives in megamoe/trainer.py; the flags and the typed run config in megamoe/train_config.py
(`--help` lists them).
"""
from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

if __name__ == "__main__" and not __package__:
    # Run as a file (`deepspeed megamoe/pretrain.py ...`): import the package from the repository
    # root rather than this directory's modules as top-level ones.
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from megamoe.checkpoint import CheckpointError  # noqa: E402
from megamoe.cli import report_errors  # noqa: E402
from megamoe.data import DataError  # noqa: E402
from megamoe.distributed import end_process  # noqa: E402
from megamoe.train_config import ConfigConflict, parse_args  # noqa: E402
from megamoe.trainer import Trainer  # noqa: E402

# DeepSpeed's ZeRO calls a deprecated collective on every step; the warning says nothing to users.
warnings.filterwarnings("ignore", message=".*all_gather_into_tensor.*is deprecated", category=FutureWarning)


def main(argv: Optional[list[str]] = None) -> int:
    config = parse_args(argv)
    # a contradiction between flags, DeepSpeed config and checkpoint: the message, not a traceback
    with report_errors("pretrain", ConfigConflict, CheckpointError, DataError, code=2) as failed:
        return end_process(Trainer(config).train())
    return failed.code


if __name__ == "__main__":
    sys.exit(main())
