"""The loss guard: decides, identically on every rank, whether an iteration's loss is unusable
(non-finite anywhere, or a spike against the moving average of accepted losses)."""
from __future__ import annotations

from typing import Optional

from megamoe import faults
from megamoe.distributed import all_reduce_host


class LossGuard:
    """Decides, identically on every rank, whether an iteration's loss is unusable.

    `check(local_loss)` all-reduces (non-finite flag, loss) so a NaN on one rank is seen by all,
    and compares the global mean loss against an exponential moving average of accepted losses:
    above `spike_factor` x EMA (after a few iterations of history) is a spike.
    Returns None (fine), "nan" or "spike".
    """

    def __init__(self, spike_factor: float = 0.0, ema_beta: float = 0.9, min_history: int = 5):
        self.spike_factor, self.beta, self.min_history = spike_factor, ema_beta, min_history
        self.ema: Optional[float] = None
        self.n = 0

    def check(self, loss, iteration: int, extras=()) -> tuple[Optional[str], list[float]]:
        """(status, [global mean loss, *global means of extras]). One all-reduce."""
        import torch
        import torch.distributed as dist
        v = loss.detach().float().reshape(()).cpu()
        if faults.nan_loss(iteration, dist.get_rank() if dist.is_initialized() else 0):
            v = torch.full_like(v, float("nan"))
        finite = bool(torch.isfinite(v))
        # flags: any non-finite, NaN, +inf, -inf (summed over ranks), then the values to average;
        # a non-finite loss enters the sum as 0 so the extras stay usable
        flags = [float(not finite), float(bool(torch.isnan(v))), float(bool(v == float("inf"))),
                 float(bool(v == float("-inf")))]
        vals = [v if finite else torch.zeros(())] + [torch.as_tensor(e, dtype=torch.float32).detach().cpu().reshape(())
                                                     for e in extras]
        buf = torch.stack([torch.tensor(f) for f in flags] + vals)
        all_reduce_host(buf)
        world = dist.get_world_size() if dist.is_initialized() else 1
        means = (buf[4:] / world).tolist()
        if buf[0] > 0:
            # the global mean of the losses is what the message reports: NaN, or +-inf when only those
            nan, pos, neg = (float(x) > 0 for x in buf[1:4])
            return "nan", [float("nan") if nan or (pos and neg) else float("inf") if pos else float("-inf")] + means[1:]
        if (self.spike_factor > 0 and self.ema is not None and self.n >= self.min_history
                and means[0] > self.spike_factor * self.ema):
            return "spike", means
        return None, means

    def accept(self, loss_value: float) -> None:
        self.ema = loss_value if self.ema is None else self.beta * self.ema + (1 - self.beta) * loss_value
        self.n += 1

    def state_dict(self) -> dict:
        return {"ema": self.ema, "n": self.n}

    def load_state_dict(self, d: dict) -> None:
        self.ema, self.n = d.get("ema"), int(d.get("n", 0))
