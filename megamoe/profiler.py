"""`--profile`: torch.profiler over a window of training iterations, with Megatron-LM's flags.

    --profile --profile-step-start 10 --profile-step-end 12 [--profile-ranks 0 1] [--profile-dir DIR]

profiles iterations [start, end) on the listed ranks (default: rank 0) and writes, per rank,
`rank{R}.trace.json` (a Chrome trace: open it in https://ui.perfetto.dev or chrome://tracing) and
`rank{R}.ops.txt` (the ops by self time, from `key_averages`, with input shapes) into DIR (default:
`<--tensorboard-dir>/profile`, else `profile/`). Off by default: with the flag unset the profiler
never starts, so the timed loop is the users' loop. Start after the first iterations (the default
10 is Megatron's): those pay for allocation and kernel selection.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import torch

from megamoe.fileio import atomic_write_text
from megamoe.train_config import ConfigConflict, LoggingConfig


class StepProfiler:
    """Wraps iterations [start, end) of the training loop in torch.profiler on the chosen ranks."""

    def __init__(self, start: int, end: int, out_dir: Path, rank: int, device_type: str = "cpu"):
        self.start, self.end, self.out_dir, self.rank, self.device_type = start, end, Path(out_dir), rank, device_type
        self.activities = [torch.profiler.ProfilerActivity.CPU]
        if device_type == "cuda":
            self.activities.append(torch.profiler.ProfilerActivity.CUDA)
        self.sort_by = "self_cuda_time_total" if device_type == "cuda" else "self_cpu_time_total"
        self._prof: Optional[torch.profiler.profile] = None
        self._last = start          # the last iteration profiled

    @classmethod
    def from_config(cls, log: LoggingConfig, rank: int, device_type: str) -> "StepProfiler":
        """The profiler for this rank: one that never starts unless --profile is set and this rank is
        in --profile-ranks."""
        off = cls(0, 0, Path("."), rank)      # iterations count from 1: window [0, 0) never opens
        if not log.profile:
            return off
        if log.profile_step_start < 1 or log.profile_step_end <= log.profile_step_start:
            raise ConfigConflict(f"--profile-step-start {log.profile_step_start} / --profile-step-end "
                                 f"{log.profile_step_end}: profiling covers iterations [start, end), so it needs "
                                 "1 <= start < end")
        if rank not in log.profile_ranks:
            return off
        out = log.profile_dir or (Path(log.tensorboard_dir) / "profile" if log.tensorboard_dir else "profile")
        return cls(log.profile_step_start, log.profile_step_end, Path(out), rank, device_type)

    def before_step(self, it: int) -> None:
        if it == self.start and self._prof is None:
            self._prof = torch.profiler.profile(activities=self.activities, record_shapes=True)
            self._prof.__enter__()

    def after_step(self, it: int) -> None:
        if self._prof is not None:
            self._last = it
            if it >= self.end - 1:
                self.close()

    def close(self) -> None:
        """Stop and write the files (also when the run stops inside the window)."""
        if self._prof is None:
            return
        prof, self._prof = self._prof, None
        if self.device_type == "cuda":
            torch.cuda.synchronize()        # the window's kernels finish inside it
        prof.__exit__(None, None, None)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        trace = self.out_dir / f"rank{self.rank}.trace.json"
        tmp = trace.with_name(trace.name + f".tmp-{os.getpid()}")   # export takes a path, not text
        prof.export_chrome_trace(str(tmp))
        os.replace(tmp, trace)
        steps = f"{self.start}-{self._last}"
        table = prof.key_averages(group_by_input_shape=True).table(sort_by=self.sort_by, row_limit=40)
        ops = self.out_dir / f"rank{self.rank}.ops.txt"
        atomic_write_text(ops, f"rank {self.rank}, iterations {steps}, sorted by {self.sort_by}\n{table}\n")
        print(f"[rank {self.rank}] profile of iterations {steps}: {trace} (Perfetto / chrome://tracing), "
              f"{ops} (ops by self time)", flush=True)
