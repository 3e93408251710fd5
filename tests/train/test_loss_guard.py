"""LossGuard against a hand-computed oracle: the EMA recurrence, the history threshold, the spike
boundary, extras' means and the checkpointed state."""
from __future__ import annotations


import pytest
import torch

from megamoe.guard import LossGuard


def oracle_ema(values, beta):
    ema = None
    for v in values:
        ema = v if ema is None else beta * ema + (1 - beta) * v
    return ema


def test_ema_follows_the_recurrence_with_a_custom_beta():
    values = [5.0, 4.0, 4.5, 3.0, 3.5, 2.0]
    g = LossGuard(spike_factor=3.0, ema_beta=0.7, min_history=2)
    for v in values:
        g.accept(v)
    assert g.state_dict() == {"ema": pytest.approx(oracle_ema(values, 0.7), rel=1e-15), "n": len(values)}


@pytest.mark.parametrize("history, expect_spike", [(2, False), (3, True)])
def test_spikes_are_judged_only_after_min_history_accepted_losses(history, expect_spike):
    g = LossGuard(spike_factor=2.0, ema_beta=0.5, min_history=3)
    for _ in range(history):
        g.accept(4.0)
    status, means = g.check(torch.tensor(8.5), 1)
    assert status == ("spike" if expect_spike else None) and means == [8.5]


def test_the_spike_boundary_is_strictly_above_factor_times_ema():
    g = LossGuard(spike_factor=2.0, min_history=1)
    g.accept(4.0)
    assert g.check(torch.tensor(8.0), 1)[0] is None            # exactly 2 x EMA: fine
    assert g.check(torch.tensor(8.0 + 1e-3), 1)[0] == "spike"


def test_factor_zero_disables_spike_detection_but_not_nan():
    g = LossGuard(spike_factor=0.0, min_history=0)
    g.accept(1.0)
    assert g.check(torch.tensor(1e6), 1)[0] is None
    for bad in (float("nan"), float("inf"), float("-inf")):
        status, means = g.check(torch.tensor(bad), 1, extras=(torch.tensor(0.5),))
        # the reported loss is the real (non-finite) value; the extras stay usable
        assert status == "nan" and str(means[0]) == str(bad) and means[1] == 0.5


def test_extras_are_reported_as_means_beside_the_loss():
    g = LossGuard()
    status, means = g.check(torch.tensor(3.25, dtype=torch.bfloat16), 1,
                            extras=(torch.tensor(0.5), 0.125, torch.tensor([2.0])))
    assert status is None and means == [3.25, 0.5, 0.125, 2.0]


def test_state_round_trip_restores_the_decision():
    a = LossGuard(spike_factor=1.5, min_history=2)
    for v in (3.0, 2.8, 2.9):
        a.accept(v)
    b = LossGuard(spike_factor=1.5, min_history=2)
    b.load_state_dict(a.state_dict())
    assert b.state_dict() == a.state_dict()
    assert b.check(torch.tensor(1.5 * a.state_dict()["ema"] + 0.01), 1)[0] == "spike"
    fresh = LossGuard(spike_factor=1.5, min_history=2)
    fresh.load_state_dict({})
    assert (fresh.ema, fresh.n) == (None, 0)
    assert fresh.check(torch.tensor(100.0), 1)[0] is None


def test_spike_factor_is_the_multiple_of_the_moving_average():
    """A factor below 1 is legal (an aggressive guard): the threshold is factor x EMA, whatever F."""
    g = LossGuard(spike_factor=0.9, min_history=1)
    g.accept(2.0)
    assert g.check(torch.tensor(1.85), 2)[0] == "spike" and g.check(torch.tensor(1.75), 2)[0] is None


def test_defaults_are_off_beta_0_9_and_five_losses_of_history():
    """LossGuard()'s defaults: spike detection off; a factor alone gets beta 0.9 and waits for 5
    accepted losses (the values the trainer's config documents)."""
    off = LossGuard()
    for _ in range(10):
        off.accept(1.0)
    assert off.check(torch.tensor(1e9), 1)[0] is None
    g = LossGuard(spike_factor=2.0)
    for v in (1.0, 2.0, 2.0, 2.0):
        g.accept(v)
    assert g.check(torch.tensor(100.0), 1)[0] is None       # 4 accepted: not judged yet
    g.accept(2.0)
    assert g.state_dict()["ema"] == pytest.approx(oracle_ema([1.0, 2.0, 2.0, 2.0, 2.0], 0.9), rel=1e-15)
    assert g.check(torch.tensor(100.0), 1)[0] == "spike"


def test_check_takes_micro_batch_losses_and_broadcasts_scalar_extras():
    """check() of [M] losses: the loss mean is over the micro-batches, a scalar extra counts once
    per micro-batch, a per-micro-batch extra keeps its values."""
    g = LossGuard()
    status, means = g.check(torch.tensor([1.0, 2.0, 6.0]), 1, extras=(0.5, torch.tensor([1.0, 2.0, 3.0])))
    assert status is None and means == [3.0, 0.5, 2.0]
    assert g.check([[1.0], [3.0]], 1)[1] == [2.0]


class _TwoRanks:
    """torch.distributed as seen by rank `rank` of 2, whose all_reduce adds the other rank's sums
    (its losses given; its extras equal to this rank's)."""

    def __init__(self, rank, other_losses):
        self.rank, self.other = rank, torch.tensor(other_losses, dtype=torch.float64)

    def install(self, monkeypatch):
        import torch.distributed as dist
        monkeypatch.setattr(dist, "is_initialized", lambda: True)
        monkeypatch.setattr(dist, "get_rank", lambda: self.rank)
        monkeypatch.setattr(dist, "get_world_size", lambda: 2)
        monkeypatch.setattr(dist, "all_reduce", self.all_reduce)

    def all_reduce(self, sums):
        loss = self.other
        flags = torch.stack([loss.isnan(), loss == float("inf"), loss == float("-inf")], 1).double()
        sums += torch.cat([flags, torch.where(loss.isfinite(), loss, 0.0)[:, None], sums[:, 4:]], 1)


def test_two_ranks_judge_the_global_mean_and_share_bad_losses(monkeypatch):
    """Over 2 ranks: means are over both ranks' micro-batches, a spike is judged on the global mean,
    and a non-finite loss on the other rank makes this rank's verdict bad too."""
    _TwoRanks(0, [3.0, 5.0]).install(monkeypatch)
    g = LossGuard(spike_factor=2.0, min_history=1)
    g.accept(2.0)
    status, means = g.judge(torch.tensor([[1.0], [3.0]]), 1).read()
    assert status is None and means == [3.0]                 # (1 + 3 + 3 + 5) / 4
    status, means = g.judge(torch.tensor([[1.0], [4.5]]), 1).read()
    assert status == "spike" and means == [4.75]             # micro-batch 2: (4.5 + 5) / 2 > 2 x 2
    _TwoRanks(1, [float("nan"), 1.0]).install(monkeypatch)
    verdict = g.judge(torch.tensor([[1.0], [1.0]]), 1)
    assert verdict.read()[0] == "nan" and torch.isnan(verdict.scale)


def test_injected_nan_loss_hits_rank_0_at_the_planned_iteration(monkeypatch):
    from megamoe import faults
    monkeypatch.setenv(faults.ENV, '{"nan_loss_iters": [3]}')
    faults.plan.cache_clear()
    try:
        g = LossGuard()
        rows = torch.tensor([[2.0, 0.5], [2.0, 0.25]])
        assert g.judge(rows, 2).read() == (None, [2.0, 0.375])
        status, means = g.judge(rows, 3).read()
        assert status == "nan" and str(means[0]) == "nan" and means[1] == 0.5   # extras survive
        _TwoRanks(1, [2.0, 2.0]).install(monkeypatch)                          # rank 1: not injected
        assert g.judge(rows, 3).read()[0] is None
    finally:
        monkeypatch.delenv(faults.ENV)
        faults.plan.cache_clear()


def test_sums_are_float64_and_a_fresh_guard_has_no_ema():
    """The micro-batch sums are float64 whatever the losses' dtype (a float32 sum of 2**24 + 1 + 1
    loses the ones); a guard that accepted nothing saves ema None."""
    g = LossGuard()
    assert g.state_dict() == {"ema": None, "n": 0}
    big = torch.tensor([[2.0 ** 24], [1.0], [1.0]], dtype=torch.float32)
    v = g.judge(big, 1)
    assert v.sums_MC.dtype == torch.float64 and v.read()[1] == [(2.0 ** 24 + 2) / 3]
