"""One rank of the loop-placement check (tests/train/test_placement.py), run as a plain process.

Trains a few iterations of `tiny` in-process with evaluation and QK-clip on, after swapping in a
separate gloo "host" group (as under NCCL) and a spy on torch.distributed.all_reduce and on the
batch transfer; prints what it saw as one JSON line."""
from __future__ import annotations

import json
import sys

import torch.distributed as dist

from megamoe import distributed, trainer
from megamoe.train_config import parse_args


def main(data: str, ds_config: str) -> None:
    distributed.init_distributed()
    host = dist.new_group(backend="gloo")
    distributed._HOST_GROUP = host            # what init_distributed makes under NCCL
    calls, moved = [], []
    real = dist.all_reduce

    def spy(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
        caller = sys._getframe(1).f_globals.get("__name__", "")
        calls.append({"caller": caller, "device": tensor.device.type, "host_group": group is host})
        return real(tensor, op=op, group=group, async_op=async_op)

    dist.all_reduce = spy
    real_to_device = trainer.to_device

    def spy_to_device(batch):
        moved.append(sorted(batch))
        return real_to_device(batch)

    trainer.to_device = spy_to_device
    cfg = parse_args(["--model-config", "tiny", "--data-path", data, "--seq-length", "32", "--train-iters", "3",
                      "--lr", "1e-3", "--eval-interval", "2", "--eval-iters", "1", "--log-interval", "1",
                      "--qk-clip-tau", "100", "--deepspeed-config", ds_config, "--loss-spike-factor", "5"])
    rc = trainer.Trainer(cfg).train()
    print("PLACEMENT " + json.dumps({"rc": rc, "calls": calls, "moved": moved}), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
    distributed.end_process(0)   # gloo threads must not meet interpreter teardown
