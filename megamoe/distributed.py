"""Process-group setup through DeepSpeed, the same on 8 GPUs, a hostfile cluster or 2 CPU ranks.

`init_distributed()` is the only place that starts torch.distributed. It works under the
`deepspeed` launcher, torchrun, or a plain `python` (then as a single rank, without mpi4py).
"""
from __future__ import annotations

import os
import socket


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_distributed(timeout_minutes: int = 30) -> None:
    import datetime

    import deepspeed
    import deepspeed.ops
    import torch

    if torch.distributed.is_initialized():
        return
    if "RANK" not in os.environ:
        # Plain `python`: a world of one. Without these DeepSpeed goes looking for mpi4py.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT", str(free_port())))
    if not torch.cuda.is_available():
        # The shared-memory comm op is an inference-only CPU optimisation that DeepSpeed JIT-builds
        # on first init (about two minutes); gloo needs none of it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(minutes=timeout_minutes))
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))


def rank() -> int:
    import torch
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    import torch
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0
