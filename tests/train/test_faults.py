"""The test-only fault switch: inert by default, strict about what it is given."""
import pytest

from megamoe import faults


def test_faults_are_inert_unless_set(monkeypatch):
    monkeypatch.delenv(faults.ENV, raising=False)
    faults.plan.cache_clear()
    assert faults.plan() == {} and not faults.nan_loss(3, 0)
    faults.crash_in_save(6, 1)   # returns: nothing planned


def test_plan_is_read_from_the_environment(monkeypatch):
    monkeypatch.setenv(faults.ENV, faults.env(nan_loss_iters=[3])[faults.ENV])
    faults.plan.cache_clear()
    try:
        assert faults.nan_loss(3, 0) and not faults.nan_loss(3, 1) and not faults.nan_loss(4, 0)
    finally:
        faults.plan.cache_clear()


def test_unknown_faults_are_refused(monkeypatch):
    with pytest.raises(ValueError, match="unknown fault"):
        faults.env(nan_loss=[1])
    monkeypatch.setenv(faults.ENV, '{"crash": 1}')
    faults.plan.cache_clear()
    try:
        with pytest.raises(ValueError, match="unknown fault"):
            faults.plan()
    finally:
        faults.plan.cache_clear()
