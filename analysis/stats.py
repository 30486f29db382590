"""The numbers the report states, as pure functions of explicit inputs."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def finite(values) -> np.ndarray:
    """The values as floats, None, NaN and inf left out: a seed without the value says nothing of it."""
    v = np.asarray(values, dtype=float)
    return v[np.isfinite(v)]


def mean_ci95(values) -> tuple[float, float]:
    """Mean and the half-width of its 95% t-interval over seeds (nan half-width for fewer than 2 finite values)."""
    v = finite(values)
    if len(v) == 0:
        return float("nan"), float("nan")
    if len(v) < 2:
        return float(v.mean()), float("nan")
    return float(v.mean()), float(stats.t.ppf(0.975, len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v)))


def lr_sensitivity(final_losses, init_loss: float) -> float:
    """Wortsman et al. (2023): mean over the LR grid of min(final loss, loss at init) minus the best final loss.

    A diverged or non-finite final loss counts as the loss at init.
    """
    capped = capped_losses(final_losses, np.zeros(len(final_losses), dtype=bool), init_loss)
    return float(capped.mean() - capped.min())


def layer_spread(norms) -> float:
    """Largest over smallest per-layer gradient norm at one step (1 = uniform across layers)."""
    v = np.asarray(norms, dtype=float)
    return float(v.max() / v.min())


def welch_difference(a, b) -> tuple[float, float]:
    """mean(b) - mean(a) and the 95% half-width of that difference (Welch's t, Welch-Satterthwaite df); nan half-width
    for fewer than 2 finite values a side."""
    a, b = finite(a), finite(b)
    if len(a) < 2 or len(b) < 2:
        return float(b.mean() - a.mean()) if len(a) and len(b) else float("nan"), float("nan")
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    if va + vb == 0:
        return float(b.mean() - a.mean()), 0.0
    df = (va + vb) ** 2 / (va ** 2 / (len(a) - 1) + vb ** 2 / (len(b) - 1))
    return float(b.mean() - a.mean()), float(stats.t.ppf(0.975, df) * math.sqrt(va + vb))


def paired_difference(a, b) -> tuple[float, float]:
    """mean(b - a) over pairs (a[i], b[i]: the same seed) and its 95% t half-width (pairs - 1 df); nan half-width for
    fewer than 2 pairs with both values finite."""
    d = finite(np.asarray(b, dtype=float) - np.asarray(a, dtype=float))  # a pair lacking either side is left out
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("nan")
    return float(d.mean()), float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))


def within_noise(a, b, paired: bool = False) -> bool | None:
    """The difference of the means lies inside its 95% t-interval (Welch's, or paired by seed): the same verdict as the
    t-test at p = 0.05, where a flat "2 SE" would be far too narrow with 2-5 seeds. None where there are fewer than 2
    values a side: there is no estimate of the noise to say either. No difference at all is within any noise, even none."""
    diff, half_width = (paired_difference if paired else welch_difference)(a, b)
    return None if math.isnan(half_width) else bool(abs(diff) < half_width or diff == 0)


NOISE_VERDICTS = {True: "within seed noise", False: "outside seed noise", None: "seed noise unknown (fewer than 2 seeds)"}


def noise_verdict(a, b, paired: bool = False) -> str:
    """within_noise in words."""
    return NOISE_VERDICTS[within_noise(a, b, paired)]


def capped_losses(final_losses, diverged, init_loss: float) -> np.ndarray:
    """Each run's final loss as LR sensitivity counts it: a diverged or non-finite one is the loss at init, none above it.
    Averaged over seeds only after this, so an LR where some seeds diverged is not scored on its survivors."""
    v = np.where(np.asarray(diverged, dtype=bool), np.nan, np.asarray(final_losses, dtype=float))
    return np.minimum(np.where(np.isfinite(v), v, init_loss), init_loss)
