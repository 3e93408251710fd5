"""Process-group setup through DeepSpeed, the same on 8 GPUs, a hostfile cluster or 2 CPU ranks.

`init_distributed()` is the only place that starts torch.distributed. It works under the
`deepspeed` launcher, torchrun, or a plain `python` (then as a single rank, without mpi4py).

One place decides the device: DeepSpeed's accelerator (`device()`; cuda:LOCAL_RANK on GPUs, the
CPU otherwise), which also names the communication backend (NCCL or gloo). Under NCCL the default
group takes device tensors only, so the host-side scalars of the training loop (stop flags,
timers, the loss guard's flags, evaluation sums, QK-clip maxima) go through `all_reduce_host`, on a
gloo group over the same ranks that never waits on the GPU stream.
"""
from __future__ import annotations

import os
import socket
import sys


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def set_deterministic(on: bool) -> list[str]:
    """--deterministic: what a GPU run needs to repeat itself bit for bit (a CPU run already does).
    Returns what it changed, for the start-up log. Call before the first CUDA matmul (cuBLAS reads
    CUBLAS_WORKSPACE_CONFIG when it creates its handle)."""
    import torch

    from megamoe.kernels import set_attention_deterministic
    if not on:
        return []
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    set_attention_deterministic(True)
    return ["torch.use_deterministic_algorithms(True)", f"CUBLAS_WORKSPACE_CONFIG={os.environ['CUBLAS_WORKSPACE_CONFIG']}",
            "FlashAttention deterministic backward; SDPA on CUDA through its math kernel"]


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
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    if acc.device_name() == "cpu":
        # The shared-memory comm op is an inference-only CPU optimisation that DeepSpeed JIT-builds
        # on first init (about two minutes); gloo needs none of it.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    else:
        acc.set_device(int(os.environ.get("LOCAL_RANK", 0)))   # before the group: NCCL binds to this device
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(),
                               timeout=datetime.timedelta(minutes=timeout_minutes))
    _make_host_group()


def shutdown_distributed() -> None:
    """Wait for every rank, then take the process groups down (torch asks for this before exit)."""
    global _HOST_GROUP
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
        _HOST_GROUP = None


def end_process(code: int) -> int:
    """The end of a launched rank: shut the groups down, flush, and leave without interpreter
    teardown. Gloo's worker threads still alive at teardown abort the process ("terminate called
    without an active exception", pytorch/pytorch#190489), after the run has finished and its
    files are written, turning a good run into exit code -6; DeepSpeed keeps references to its
    groups, so destroying them is not enough. A world of one returns `code` as usual."""
    import logging

    import torch.distributed as dist
    multi = dist.is_initialized() and dist.get_world_size() > 1
    shutdown_distributed()
    if not multi:
        return code
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_HOST_GROUP = None


def _make_host_group() -> None:
    """Every rank, right after init (new_group is collective)."""
    global _HOST_GROUP
    import torch.distributed as dist
    if dist.get_backend() != "gloo":
        _HOST_GROUP = dist.new_group(backend="gloo")


def host_group():
    """The group for CPU tensors: the default one when it is gloo, else a gloo group over all ranks."""
    return _HOST_GROUP


def all_reduce_host(t, op=None):
    """All-reduce a CPU tensor over all ranks (in place; returns it). A no-op without a process group."""
    import torch.distributed as dist
    if t.device.type != "cpu":
        raise ValueError(f"all_reduce_host takes CPU tensors, got one on {t.device}")
    if dist.is_initialized():
        dist.all_reduce(t, group=host_group(), **({"op": op} if op is not None else {}))
    return t


def device():
    """The device this rank computes on: DeepSpeed's accelerator's current device."""
    import torch
    from deepspeed.accelerator import get_accelerator
    return torch.device(get_accelerator().current_device_name())


def to_device(batch: dict) -> dict:
    """A batch of CPU tensors on `device()`: pinned and copied without blocking the host (the
    copy is ordered before the forward on the same stream)."""
    dev = device()
    if dev.type == "cpu":
        return batch
    if dev.type == "cuda":
        return {k: v.pin_memory().to(dev, non_blocking=True) for k, v in batch.items()}
    return {k: v.to(dev) for k, v in batch.items()}


def rank() -> int:
    import torch
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def world_size() -> int:
    import torch
    return torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1


def is_main() -> bool:
    return rank() == 0
