"""Fault injection for the test suite: one switch, inert unless set.

The trainer runs in launcher subprocesses, so the plan travels in one environment variable,
read once, as JSON:

    MEGAMOE_FAULTS='{"nan_loss_iters": [3], "iteration_sleep_s": 0.5, "crash_in_save": {"step": 6, "rank": 1}}'

- nan_loss_iters: these iterations' loss reads as NaN on rank 0 (the loss guard must catch it);
- inf_grad_iters: these iterations' backward on rank 0 runs on loss x inf, so the gradients are
  non-finite while the loss is not (DeepSpeed's overflow check must skip the step, the guard count it);
- nan_router_iters: in these iterations the router logits of the first token of every MoE layer
  on rank 1 are NaN (under expert parallelism every rank must still agree on the all-to-all
  sizes, and the guard must skip the step);
- iteration_sleep_s: sleep after every iteration (time for a test to send a signal or a kill);
- crash_in_save: rank `rank` (default 1) dies after writing its engine files for step `step`,
  before the checkpoint is complete.
Production code calls the functions below at those points and nothing else reads it.
"""
from __future__ import annotations

import functools
import json
import os
import time

ENV = "MEGAMOE_FAULTS"
_KNOWN = ("nan_loss_iters", "inf_grad_iters", "nan_router_iters", "iteration_sleep_s", "crash_in_save")
_now = {"iteration": None, "rank": 0}


@functools.lru_cache(maxsize=None)
def plan() -> dict:
    raw = os.environ.get(ENV)
    if not raw:
        return {}
    try:
        d = json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{ENV} is not valid JSON ({e.msg}): {raw!r}") from None
    unknown = sorted(set(d) - set(_KNOWN))
    if unknown:
        raise ValueError(f"{ENV}: unknown fault(s) {unknown}; known: {list(_KNOWN)}")
    return d


def nan_loss(iteration: int, rank: int) -> bool:
    return rank == 0 and iteration in plan().get("nan_loss_iters", ())


def grad_scale(iteration: int, rank: int) -> float:
    return float("inf") if rank == 0 and iteration in plan().get("inf_grad_iters", ()) else 1.0


def begin_iteration(iteration: int, rank: int) -> None:
    """The trainer says which training iteration runs (None: not training, e.g. evaluation)."""
    _now.update(iteration=iteration, rank=rank)


def nan_router_logits() -> bool:
    return _now["rank"] == 1 and _now["iteration"] in plan().get("nan_router_iters", ())


def iteration_sleep() -> None:
    seconds = plan().get("iteration_sleep_s")
    if seconds:
        time.sleep(float(seconds))


def crash_in_save(step: int, rank: int) -> None:
    crash = plan().get("crash_in_save")
    if crash and int(crash["step"]) == step and rank == int(crash.get("rank", 1)):
        os._exit(9)


def env(**faults) -> dict[str, str]:
    """The environment entry that sets `faults` in a child process (for tests)."""
    unknown = sorted(set(faults) - set(_KNOWN))
    if unknown:
        raise ValueError(f"unknown fault(s) {unknown}; known: {list(_KNOWN)}")
    return {ENV: json.dumps(faults)}
