import numpy as np
import pytest

from experiments.boundary import boundary, bracket, converged, fit_logistic


def test_converged_rule():
    assert converged(0.5, 2.3, 0.5)
    assert not converged(1.15, 2.3, 0.5)  # exactly half the initial loss is not enough
    assert not converged(float("nan"), 2.3, 0.5)


def test_bracket():
    x = np.array([-3, -2, -1.5, -1, 0.0])
    failed = np.array([False, False, True, False, True])
    assert bracket(x, failed) == (-1.0, -1.5)
    assert bracket(x, np.zeros(5, bool)) == (0.0, None)


def test_logistic_recovers_a_known_boundary():
    rng = np.random.default_rng(0)
    x = rng.uniform(-4, 0, 400)
    failed = rng.random(400) < 1 / (1 + np.exp(-3.0 * (x + 1.5)))
    x0, slope = fit_logistic(x, failed)
    assert x0 == pytest.approx(-1.5, abs=0.15) and slope == pytest.approx(3.0, rel=0.3)
    result = boundary(x, failed, bootstrap=50)
    low, high = result["boundary_lr_90ci"]
    assert low < 10**-1.5 < high and low < result["boundary_lr"] < high


def test_no_boundary_inside_the_range():
    result = boundary([-3, -2, -1], [False, False, False])
    assert "boundary_lr" not in result and result["smallest_failed_lr"] is None


def test_failures_only_at_low_lr_give_no_increasing_boundary():
    x = np.array([-3.0, -3.0, -2.0, -1.5, -1.0, -0.5])
    failed = np.array([True, True, False, False, False, False])  # slow at the smallest LR, never diverging
    x0, slope = fit_logistic(x, failed)
    assert slope < 0.5 and -4.0 <= x0 <= 0.5  # flat and bounded, not a boundary at low LR
    assert "boundary_lr" not in boundary(x, failed)
