"""Figures as functions of tidy tables; each returns a matplotlib Figure (titled, labelled, with units and legend)."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

sns.set_theme(style="whitegrid", context="notebook")
SMOOTH = 25  # steps in the rolling mean of per-step curves (per-batch values are noisy)
KNOWN = ("no_tricks", "batchnorm", "layernorm", "all_tricks")  # a config keeps its colour in every figure


def palette(configs) -> dict[str, str]:
    """config -> colour, the seed's four first, any other config after them."""
    extra = sorted(set(configs) - set(KNOWN))
    return {c: f"C{i}" for i, c in enumerate([*KNOWN, *extra]) if c in set(configs)}


def loss_curves(hist: pd.DataFrame) -> plt.Figure:
    """hist: config, seed, step, value (train/loss). Mean over seeds with a +-1 sd band, log y."""
    hist = hist.sort_values("step").assign(
        value=lambda d: d.groupby(["config", "seed"]).value.transform(lambda s: s.rolling(SMOOTH, min_periods=1).mean()))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    sns.lineplot(hist, x="step", y="value", hue="config", palette=palette(hist.config), errorbar="sd", ax=ax, linewidth=1)
    ax.set(yscale="log", xlabel="update step", ylabel="train loss (nats, log scale)",
           title=f"Training loss, mean over seeds ± 1 sd (rolling mean of {SMOOTH} steps)")
    return fig


def layer_grad_norms(snap: pd.DataFrame) -> plt.Figure:
    """snap: config, seed, step, layer, grad_norm. Per-layer pre-clip grad norm at each snapshot step, one panel per config."""
    grid = sns.catplot(snap, x="layer", y="grad_norm", hue="step", col="config", col_order=list(palette(snap.config)),
                       kind="bar", errorbar="sd",
                       col_wrap=2, height=3.2, aspect=1.6, palette="viridis")
    grid.set(yscale="log")
    grid.set_axis_labels("layer (parameter tensor)", "pre-clip grad norm (log)")
    for ax in grid.axes.flat:
        ax.tick_params(axis="x", rotation=60)
    grid.figure.suptitle("Per-layer gradient norms at the snapshot steps (mean over seeds, bars ± 1 sd)", y=1.02)
    return grid.figure


def layer_spread_over_steps(per_seed: pd.DataFrame) -> plt.Figure:
    """per_seed: config, step, seed, spread. Largest/smallest layer norm at each snapshot step, one line per config."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(per_seed, x="step", y="spread", hue="config", palette=palette(per_seed.config), marker="o", errorbar="sd", ax=ax)
    ax.axhline(1, color="black", linewidth=0.8)
    ax.set(xscale="log", yscale="log", xlabel="update step (log)", ylabel="largest / smallest layer grad norm (log)",
           title="Spread of gradient norms across layers (mean ± 1 sd over seeds; 1 = uniform)")
    return fig


def grad_norm_over_training(hist: pd.DataFrame, max_norm: float | None, p90: dict[str, float]) -> plt.Figure:
    """hist: config, seed, step, value (opt/grad_norm_preclip). Clip threshold and each config's 90th percentile drawn in."""
    hist = hist.sort_values("step").assign(
        value=lambda d: d.groupby(["config", "seed"]).value.transform(lambda s: s.rolling(SMOOTH, min_periods=1).mean()))
    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = palette(hist.config)
    sns.lineplot(hist, x="step", y="value", hue="config", palette=colours, errorbar="sd", ax=ax, linewidth=1)
    if max_norm is not None:
        ax.axhline(max_norm, color="black", linestyle="--", label=f"clip threshold max_norm = {max_norm:g}")
    for config, value in p90.items():
        ax.axhline(value, color=colours[config], linestyle=":", label=f"{config}: 90th percentile of pre-clip norms = {value:.2f}")
    ax.set(yscale="log", xlabel="update step", ylabel="pre-clip global grad norm (log)",
           title=f"Gradient norm over training, mean over seeds ± 1 sd (rolling {SMOOTH} steps)")
    ax.legend(fontsize=8)
    return fig


def lr_stress(grid: pd.DataFrame, boundaries: dict[str, float]) -> plt.Figure:
    """grid: config, lr, final_loss (nan if diverged), diverged. Diverged runs drawn as x at the top."""
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ok = grid[~grid.diverged]
    colours = palette(grid.config)
    sns.lineplot(ok, x="lr", y="final_loss", hue="config", palette=colours, marker="o", errorbar="sd", ax=ax)
    top = ok.final_loss.max() if len(ok) else 2.3
    bad = grid[grid.diverged]
    for config, colour in colours.items():
        rows = bad[bad.config == config]
        if len(rows):
            ax.scatter(rows.lr, [top * 1.5] * len(rows), marker="x", color=colour, s=60, label=f"{config} diverged")
        if config in boundaries:
            ax.axvline(boundaries[config], color=colour, linestyle="--", linewidth=1, label=f"{config} stress boundary")
    ax.set(xscale="log", yscale="log", xlabel="peak learning rate (log)", ylabel="final train loss (nats, log)",
           title="Final loss against learning rate (mean ± 1 sd over seeds; x = diverged)")
    ax.legend(fontsize=7, ncol=2)
    return fig


def warmup_vs_size(grid: pd.DataFrame) -> plt.Figure:
    """grid: params (count), warmup (label), warmup_epochs, lr, final_loss. One panel per warmup length, one curve per size."""
    panels = list(grid.sort_values("warmup_epochs").warmup.unique())
    g = sns.relplot(grid, x="lr", y="final_loss", hue="params", col="warmup", col_order=panels, kind="line", marker="o", errorbar="sd",
                    palette="viridis", height=3.6, aspect=1.2, hue_norm=matplotlib.colors.LogNorm())
    g.set(xscale="log", yscale="log")
    g.set_axis_labels("peak learning rate (log)", "final train loss (nats, log)")
    g.figure.suptitle("Final loss against LR per model size, without and with warmup (diverged runs: no point)", y=1.03)
    return g.figure


def sensitivity_vs_size(sens: pd.DataFrame) -> plt.Figure:
    """sens: params, warmup, sensitivity. LR sensitivity against parameter count."""
    fig, ax = plt.subplots(figsize=(6, 4))
    sns.lineplot(sens, x="params", y="sensitivity", hue="warmup", marker="o", ax=ax)
    ax.set(xscale="log", xlabel="parameters (log)", ylabel="LR sensitivity (nats)",
           title="LR sensitivity against model size")
    return fig
