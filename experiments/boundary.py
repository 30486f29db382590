"""The divergence boundary as pure functions: outcome rule, bracket, logistic fit of P(fail) against log10 LR."""
from __future__ import annotations

import math

import numpy as np

CONVERGE_RATIO = 0.5  # default: converged = final train loss below half the loss of step 0
CHANCE_LOSS = math.log(10)  # cross-entropy of guessing among 10 classes: a run at or above it has learned nothing
MIN_SLOPE = 1.0  # per decade of LR; below it the fit has found no boundary


def converged(final_loss: float, initial_loss: float, ratio: float) -> bool:
    """A run converged when its final train loss is below ratio x its loss at step 0 (and finite)."""
    return bool(np.isfinite(final_loss)) and final_loss < ratio * initial_loss


def bracket(log_lrs: np.ndarray, failed: np.ndarray) -> tuple[float | None, float | None]:
    """(largest log10 LR that converged, smallest log10 LR that failed); None where there is none."""
    ok, bad = log_lrs[~failed], log_lrs[failed]
    return (float(ok.max()) if ok.size else None, float(bad.min()) if bad.size else None)


def fit_logistic(log_lrs: np.ndarray, failed: np.ndarray, l2: float = 1e-2) -> tuple[float, float]:
    """(x0, slope) of P(fail) = sigmoid(slope * (x - x0)), slope >= 0, maximum likelihood with a small L2 on the slope.

    slope >= 0 encodes the assumption that a larger LR is never safer; the penalty keeps the fit
    finite when the outcomes are perfectly separated by LR.
    """
    y = failed.astype(float)
    lo, hi = float(log_lrs.min()), float(log_lrs.max())

    def loss(theta):
        x0, raw = theta
        slope = np.logaddexp(0, raw)  # softplus: slope >= 0
        z = slope * (log_lrs - x0)
        return np.sum(np.logaddexp(0, z) - y * z) + l2 * slope**2

    from scipy.optimize import minimize  # here: every sweep worker imports this module for CHANCE_LOSS, none fits

    x0, raw = minimize(loss, [float(np.median(log_lrs)), 0.5], method="Nelder-Mead").x
    return float(np.clip(x0, lo - 1, hi + 1)), float(np.logaddexp(0, raw))  # x0 kept within a decade of the data


def boundary(log_lrs, failed, bootstrap: int = 200, seed: int = 0) -> dict:
    """Bracket, logistic boundary (P(fail) = 0.5) and its 90% bootstrap interval, as LRs."""
    log_lrs, failed = np.asarray(log_lrs, float), np.asarray(failed, bool)
    lo, hi = bracket(log_lrs, failed)
    out = {"largest_converged_lr": 10**lo if lo is not None else None,
           "smallest_failed_lr": 10**hi if hi is not None else None, "n": int(len(failed)), "failed": int(failed.sum())}
    if failed.all() or not failed.any():
        return out  # no boundary inside the probed range
    x0, slope = fit_logistic(log_lrs, failed)
    if slope < MIN_SLOPE:  # failures do not rise with LR (e.g. only slow convergence at small LRs)
        return {**out, "slope_per_decade": slope}
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(bootstrap):
        i = rng.integers(0, len(failed), len(failed))
        if failed[i].any() and not failed[i].all():
            draws.append(fit_logistic(log_lrs[i], failed[i])[0])
    low, high = np.percentile(draws, [5, 95])
    return {**out, "boundary_lr": 10**x0, "boundary_lr_90ci": (10**low, 10**high), "slope_per_decade": slope}
