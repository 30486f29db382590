"""The LR range test (Smith 2017; fastai's `lr_find`, Lightning's `LearningRateFinder`): one short run that raises the
LR exponentially each step and stops when the smoothed loss passes STOP_FACTOR x its minimum."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from .config import Config
from .data import MNIST, batches
from .determinism import configure
from .schedule import set_lr
from .train import build_parts, resolve_device, single_update

START_LR, END_LR, STEPS, STOP_FACTOR, BETA = 1e-6, 10.0, 100, 4.0, 0.98  # fastai's defaults, Smith's stop rule
MAX_STEPS = 1_000_000  # the test holds its LRs and losses in memory; a million updates is days here, not a range test
# Config keys the range test has no use for: it sets each update's LR itself, runs a number of updates (not epochs) and
# stops on its own rule, with no monitor, no CUDA graph and no test pass. Given on purpose, they would be silently ignored.
UNUSED_KEYS = ("optim.lr", "epochs", "schedule.", "monitor.", "compute.cuda_graphs", "data.test_subset")


@dataclass
class RangeTest:
    """LRs tried, raw and smoothed losses, the two named suggestions and where the loss blew up (None: it never did)."""

    lrs: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    smoothed: list[float] = field(default_factory=list)
    steepest_lr: float = float("nan")  # steepest descent of the smoothed loss against log LR
    min_over_10_lr: float = float("nan")  # the LR of the smoothed minimum, divided by 10
    blowup_lr: float | None = None


def exponential_lrs(start: float, end: float, steps: int) -> np.ndarray:
    """start, ..., end with a constant ratio between neighbours."""
    return start * (end / start) ** (np.arange(steps) / (steps - 1))


def smooth(losses: list[float], beta: float) -> list[float]:
    """Exponential moving average with fastai's bias correction (the first values are not pulled towards 0)."""
    avg, out = 0.0, []
    for i, loss in enumerate(losses):
        avg = beta * avg + (1 - beta) * loss
        out.append(avg / (1 - beta ** (i + 1)))
    return out


def suggest(lrs: list[float], smoothed: list[float]) -> tuple[float, float]:
    """(steepest descent LR up to the minimum, minimum LR / 10) of a smoothed loss curve; NaNs for an empty one."""
    if not lrs:  # the loss was non-finite from the first update on
        return math.nan, math.nan
    i_min = int(np.argmin(smoothed))
    if i_min < 2:  # no descent to measure
        return lrs[0], lrs[i_min] / 10
    slope = np.gradient(np.asarray(smoothed[: i_min + 1]), np.log10(lrs[: i_min + 1]))
    return float(lrs[int(np.argmin(slope))]), float(lrs[i_min] / 10)


def lr_range_test(cfg: Config, data: MNIST, start: float = START_LR, end: float = END_LR, steps: int = STEPS,
                  stop_factor: float = STOP_FACTOR, beta: float = BETA) -> RangeTest:
    """Train cfg's model for up to `steps` updates, the i-th at exponential_lrs(...)[i]; stop at the blow-up."""
    device = resolve_device(cfg.device)
    configure(cfg.compute.deterministic, device)
    data = data.to(device)
    parts = build_parts(cfg, len(data.train_y), device)
    update = single_update(parts, data, cfg.optim.max_norm)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    order: list[torch.Tensor] = []
    result = RangeTest()
    for lr in exponential_lrs(start, end, steps):
        if not order:  # as many passes over the data as the test needs
            order = batches(len(data.train_y), cfg.data.batch_size, shuffle)
        idx = order.pop(0).to(device)
        set_lr(parts.optimizer, [float(lr)] * len(parts.optimizer.param_groups))
        loss = update(idx, False)[0][0, 0].item()
        if not math.isfinite(loss):
            result.blowup_lr = float(lr)
            break
        result.lrs.append(float(lr))
        result.losses.append(loss)
        result.smoothed = smooth(result.losses, beta)
        if result.smoothed[-1] > stop_factor * min(result.smoothed):
            result.blowup_lr = float(lr)
            break
    result.steepest_lr, result.min_over_10_lr = suggest(result.lrs, result.smoothed)
    return result


def figure(result: RangeTest):
    """Smoothed and raw loss against LR (log axis) with the suggestions and the blow-up marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(result.lrs, result.losses, alpha=0.3, label="loss")
    ax.plot(result.lrs, result.smoothed, label="smoothed loss")
    for lr, name, style in ((result.steepest_lr, "steepest", "--"), (result.min_over_10_lr, "min/10", ":"),
                            (result.blowup_lr, "blow-up", "-.")):
        if lr is not None and math.isfinite(lr):
            ax.axvline(lr, linestyle=style, color="k", alpha=0.6, label=f"{name} {lr:.2g}")
    ax.set(xscale="log", xlabel="learning rate", ylabel="training loss", title="LR range test")
    ax.legend()
    return fig
