"""The learning-rate schedule: one formula for cosine / WSD / constant with linear warm-up, run by
a torch LambdaLR that DeepSpeed steps and checkpoints with the engine.

On resume the schedule is the one the flags describe, positioned at the resumed step
(`flag_schedule_kept`): a run extended with a new --train-iters, --lr or --lr-decay-style trains
at what the flags say, not at what the checkpoint's scheduler remembered.
"""
from __future__ import annotations

import contextlib
import math
from typing import Optional

DECAY_STYLES = ("cosine", "wsd", "constant")


class LRSchedule:
    """lr multiplier after `n` completed optimizer steps (so iteration n+1 trains at base * f(n)).

    Linear warmup from lr/warmup (never 0: DeepSpeed's WarmupDecayLR/WarmupCosineLR train the
    first step at warmup_min_lr, 0 by default), then
      cosine:   lr -> min_lr along a half cosine until train_iters;
      wsd:      constant lr, then a linear decay to min_lr over the last `wsd_decay_iters`;
      constant: lr.
    DeepSpeed ships no WSD and no absolute min_lr for cosine, so the three styles share this
    one formula, run by a torch LambdaLR that DeepSpeed steps and checkpoints with the engine.
    Picklable (a plain object), so LambdaLR.state_dict() carries it.
    """

    def __init__(self, style: str, lr: float, min_lr: float, warmup_iters: int, train_iters: int,
                 wsd_decay_iters: Optional[int] = None):
        if style not in DECAY_STYLES:
            raise ValueError(f"--lr-decay-style must be one of {DECAY_STYLES}, got {style!r}")
        self.style, self.lr, self.min_lr = style, float(lr), float(min_lr)
        self.warmup, self.total = int(warmup_iters), int(train_iters)
        self.wsd_decay = int(wsd_decay_iters if wsd_decay_iters is not None else max(1, round(0.2 * train_iters)))

    def __call__(self, n: int) -> float:
        it = n + 1  # the iteration this lr is used for (1-based)
        if self.warmup > 0 and it <= self.warmup:
            return it / self.warmup
        if self.style == "constant":
            return 1.0
        floor = self.min_lr / self.lr if self.lr > 0 else 0.0
        if self.style == "cosine":
            span = max(1, self.total - self.warmup)
            t = min(1.0, (it - self.warmup) / span)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * t))
        # wsd
        start = self.total - self.wsd_decay
        if it <= start:
            return 1.0
        t = min(1.0, (it - start) / self.wsd_decay)
        return 1.0 + (floor - 1.0) * t


def lr_scheduler_factory(schedule: LRSchedule):
    """What deepspeed.initialize(lr_scheduler=...) takes: a callable on the engine's optimizer."""
    def make(optimizer):
        import torch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    return make


@contextlib.contextmanager
def flag_schedule_kept(scheduler):
    """Around a checkpoint load: keep the step count the checkpoint restores (`last_epoch`) but
    this run's schedule (LambdaLR.load_state_dict overwrites the schedule object's fields and the
    base lrs in place), then set every group's lr for the next step from it."""
    if scheduler is None:
        yield
        return
    base_lrs = list(scheduler.base_lrs)
    fields = [dict(f.__dict__) for f in scheduler.lr_lambdas]
    yield
    scheduler.base_lrs = base_lrs
    for f, saved in zip(scheduler.lr_lambdas, fields):
        f.__dict__.clear()
        f.__dict__.update(saved)
    lrs = [base * f(scheduler.last_epoch) for base, f in zip(base_lrs, scheduler.lr_lambdas)]
    for group, lr in zip(scheduler.optimizer.param_groups, lrs):
        group["lr"] = lr
    scheduler._last_lr = lrs
