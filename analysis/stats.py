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
    capped = capped_losses(final_losses, np.zeros(len(final_losses), dtype=bool), init_loss)
    return float(capped.mean() - capped.min())


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


def paired_difference(a, b) -> tuple[float, float]:
    """mean(b - a) over pairs (a[i], b[i]: the same seed) and its standard error; nan SE for fewer than 2 pairs."""
    d = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if len(d) < 2:
        return float(d.mean()) if len(d) else float("nan"), float("nan")
    return float(d.mean()), float(d.std(ddof=1) / math.sqrt(len(d)))


def within_noise(a, b, paired: bool = False) -> bool | None:
    """Two samples' means differ by less than 2 standard errors of the difference (Welch), or, paired, by less than the
    95% half-width of the mean paired difference (its t-test at p = 0.05: with 2 or 3 seeds, 2 SE is far too narrow);
    None where there are fewer than 2 values a side: there is no estimate of the noise to say either. No difference at
    all is within any noise, even none."""
    diff, se = (paired_difference if paired else mean_difference)(a, b)
    bound = paired_half_width(se, len(a)) if paired else 2 * se
    return None if math.isnan(se) else bool(abs(diff) < bound or diff == 0)


def paired_half_width(se: float, pairs: int) -> float:
    """95% half-width of a mean paired difference over `pairs` pairs with standard error `se` (t, pairs - 1 df)."""
    return float(stats.t.ppf(0.975, pairs - 1) * se) if pairs >= 2 else float("nan")


NOISE_VERDICTS = {True: "within seed noise", False: "outside seed noise", None: "seed noise unknown (fewer than 2 seeds)"}


def noise_verdict(a, b, paired: bool = False) -> str:
    """within_noise in words."""
    return NOISE_VERDICTS[within_noise(a, b, paired)]


def capped_losses(final_losses, diverged, init_loss: float) -> np.ndarray:
    """Each run's final loss as LR sensitivity counts it: a diverged or non-finite one is the loss at init, none above it.
    Averaged over seeds only after this, so an LR where some seeds diverged is not scored on its survivors."""
    v = np.where(np.asarray(diverged, dtype=bool), np.nan, np.asarray(final_losses, dtype=float))
    return np.minimum(np.where(np.isfinite(v), v, init_loss), init_loss)
