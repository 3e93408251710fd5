"""The loss guard: decides, identically on every rank, whether an iteration's loss is unusable
(non-finite anywhere, or a spike against the moving average of accepted losses), on the device.

The decision never needs the host. `judge` sums the micro-batch losses over ranks with one device
all-reduce and returns a `Verdict` whose `scale` is 1 for a good iteration and NaN for a bad one;
the trainer multiplies the last micro-batch's loss by it before backward, so a bad iteration has
NaN gradients and DeepSpeed's own overflow check drops the step (the one host read of the step is
DeepSpeed's). Only when a step was dropped does the trainer ask the verdict why (`read`, a host
read off the steady-state path). Where DeepSpeed has no overflow check, the trainer reads the
verdict before backward instead (deepspeed_compat.checks_grad_overflow).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megamoe import faults
from megamoe.syncs import to_host


@dataclass
class Verdict:
    sums_MC: torch.Tensor      # [M, 3 + X] over ranks: NaN / +inf / -inf counts, loss (0 if non-finite), extras
    spike_M: torch.Tensor      # [M] bool: the micro-batch's global mean loss spiked
    world: int

    @property
    def bad(self) -> torch.Tensor:
        return (self.sums_MC[:, :3].sum(1) > 0).any() | self.spike_M.any()

    @property
    def scale(self) -> torch.Tensor:
        """1.0, or NaN when the iteration must not update the weights (a device scalar)."""
        return torch.where(self.bad, float("nan"), 1.0).to(torch.float32)

    @property
    def means(self) -> torch.Tensor:
        """[1 + X] global means of [loss, *extras] over ranks and micro-batches (device)."""
        return self.sums_MC[:, 3:].mean(0) / self.world

    def read(self) -> tuple[Optional[str], list[float]]:
        """(None | "nan" | "spike", host means): those of the first bad micro-batch, or of all."""
        sums = to_host(torch.cat([self.sums_MC, self.spike_M[:, None].to(self.sums_MC.dtype)], 1)).numpy()
        means_MX = sums[:, 3:-1] / self.world
        for m in range(sums.shape[0]):
            nan, pos, neg = (sums[m, i] > 0 for i in range(3))
            if nan or pos or neg:
                # the global mean of the losses is what the message reports: NaN, or +-inf when only those
                value = float("nan") if nan or (pos and neg) else float("inf") if pos else float("-inf")
                return "nan", [value] + means_MX[m, 1:].tolist()
        for m in range(sums.shape[0]):
            if sums[m, -1] > 0:
                return "spike", means_MX[m].tolist()
        return None, means_MX.mean(axis=0).tolist()


class LossGuard:
    """Spike threshold: `spike_factor` x an exponential moving average of accepted losses, once
    `min_history` iterations were accepted (0 turns spike detection off; non-finite losses are
    always bad). The EMA lives on the device of the losses."""

    def __init__(self, spike_factor: float = 0.0, ema_beta: float = 0.9, min_history: int = 5):
        self.spike_factor, self.beta, self.min_history = spike_factor, ema_beta, min_history
        self.ema: Optional[torch.Tensor] = None
        self.n = 0

    def judge(self, losses_MX: torch.Tensor, iteration: int) -> Verdict:
        """losses_MX: [M, 1 + X] this rank's micro-batch [loss, *extras]. One device all-reduce."""
        import torch.distributed as dist
        distributed = dist.is_available() and dist.is_initialized()
        rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
        v = losses_MX.detach().to(torch.float64).reshape(losses_MX.shape[0], -1)
        if faults.nan_loss(iteration, rank):
            v = torch.cat([torch.full_like(v[:, :1], float("nan")), v[:, 1:]], 1)
        loss = v[:, 0]
        flags = torch.stack([loss.isnan(), loss == float("inf"), loss == float("-inf")], 1).to(v.dtype)
        sums = torch.cat([flags, torch.where(loss.isfinite(), loss, 0.0)[:, None], v[:, 1:]], 1)
        if distributed and world > 1:
            dist.all_reduce(sums)
        spike = torch.zeros(sums.shape[0], dtype=torch.bool, device=sums.device)
        if self.spike_factor > 0 and self.ema is not None and self.n >= self.min_history:
            spike = sums[:, 3] / world > self.spike_factor * self.ema.to(sums.device)
        return Verdict(sums, spike, world)

    def check(self, losses, iteration: int, extras=()) -> tuple[Optional[str], list[float]]:
        """judge + read for a scalar or [M] loss and extras of the same shape (a host read)."""
        loss_M = torch.as_tensor(losses).detach().reshape(-1)
        cols = [loss_M] + [torch.as_tensor(e, device=loss_M.device).detach().reshape(-1).expand_as(loss_M)
                           for e in extras]
        return self.judge(torch.stack([c.double() for c in cols], 1), iteration).read()

    def accept(self, loss) -> None:
        """Fold an accepted iteration's mean loss (device scalar or float) into the EMA."""
        loss = torch.as_tensor(loss, dtype=torch.float64).detach()
        self.ema = loss.clone() if self.ema is None else self.beta * self.ema.to(loss.device) + (1 - self.beta) * loss
        self.n += 1

    def state_dict(self) -> dict:
        return {"ema": None if self.ema is None else float(to_host(self.ema)), "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        ema = d.get("ema")
        self.ema = None if ema is None else torch.tensor(float(ema), dtype=torch.float64)
        self.n = int(d.get("n", 0))
