"""The numbers the report states, as pure functions of explicit inputs."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds (nan half-width for fewer than 2 values)."""
    v = np.asarray([x for x in values if x is not None and math.isfinite(x)], dtype=float)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def lr_sensitivity(final_losses, init_loss: float) -> float:
    """Wortsman et al. (2023): mean over the LR grid of min(final loss, loss at init) minus the best final loss.

    A diverged or non-finite final loss counts as the loss at init.
    """
    capped = [min(x, init_loss) if x is not None and math.isfinite(x) else init_loss for x in final_losses]
    return float(np.mean(capped) - min(capped))


def layer_spread(norms) -> float:
    """Largest over smallest per-layer gradient norm at one step (1 = uniform across layers)."""
    v = np.asarray(norms, dtype=float)
    return float(v.max() / v.min())


def mean_difference(a, b) -> tuple[float, float]:
    """mean(b) - mean(a) and the standard error of that difference (Welch); nan SE for fewer than 2 values a side."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    if len(a) < 2 or len(b) < 2:
        return float(b.mean() - a.mean()) if len(a) and len(b) else float("nan"), float("nan")
    return float(b.mean() - a.mean()), math.sqrt(a.var(ddof=1) / len(a) + b.var(ddof=1) / len(b))


def within_noise(a, b) -> bool:
    """Two samples' means differ by less than 2 standard errors of the difference (Welch)."""
    diff, se = mean_difference(a, b)
    return bool(abs(diff) < 2 * se)  # False when either side has fewer than 2 values (nan SE)
