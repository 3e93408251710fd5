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
