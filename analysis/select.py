"""Which runs each section reads: classified by the config keys a run overrides (its tag), at one scale, one run per cell."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis.load import KEYS
from cookbook.config import CONFIGS_DIR, TEST_SIZE, TRAIN_SIZE, ConfigError, load_config
from experiments.boundary import CONVERGE_RATIO, converged

# Overrides in these sections change what is trained (the treatment); any other override (seed, epochs,
# data subsets, device, precision, monitoring) changes how or how long it is trained, which is the scale.
TREATMENT_SECTIONS = ("model.", "optim.", "schedule.")
LR_KEY, SIZE_KEYS, WARMUP_KEY = "optim.lr", ("model.width", "model.depth"), "schedule.warmup_epochs"
SIZE_ALLOWED = {LR_KEY, WARMUP_KEY, *SIZE_KEYS}  # what a size sweep's run may override
SCALE = ["epochs", "train_images", "test_images", "batch_size", "precision"]
MIN_GRID_LRS = 3  # an LR curve needs 3 points to show a minimum: prefer the largest scale that has them
CELL = ["config", "lr", "width", "depth", "warmup_epochs", "seed"]
TREATMENT_COLUMNS = [column for column, key in KEYS.items() if key.startswith(TREATMENT_SECTIONS)]


def treatments(overrides: str | None) -> frozenset[str] | None:
    """The treatment keys in an `overrides` tag value; None when the run has no such tag (made before it existed)."""
    if overrides is None or (isinstance(overrides, float) and np.isnan(overrides)):
        return None
    return frozenset(k for k in overrides.split(",") if k.startswith(TREATMENT_SECTIONS))


def with_scale(runs: pd.DataFrame) -> pd.DataFrame:
    """Adds the images each run trained and tested on (a subset or the whole set) and a readable scale label."""
    runs = runs.assign(train_images=runs.train_subset.fillna(TRAIN_SIZE).clip(upper=TRAIN_SIZE).astype(int),
                       test_images=runs.test_subset.fillna(TEST_SIZE).clip(upper=TEST_SIZE).astype(int))
    return runs.assign(scale=[scale_label(r) for r in runs.itertuples()])


def scale_label(run) -> str:
    """'5 epochs on 60,000 training images (all), tested on 10,000, batch 128, fp32'."""
    whole = " (all)" if run.train_images == TRAIN_SIZE else ""
    return (f"{int(run.epochs)} epochs on {run.train_images:,} training images{whole}, tested on {run.test_images:,}, "
            f"batch {int(run.batch_size)}, {run.precision}")


def main_scale(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs made at one scale, one run per cell (the latest): the scale that covers the most configs, then the
    largest (most images seen in training), then the latest. Coverage first: one longer run of one config must not hide
    every other config's runs."""
    if runs.empty:
        return runs
    by_scale = runs.assign(size=runs.epochs * runs.train_images).groupby("scale").agg(
        configs=("config", "nunique"), size=("size", "max"), last=("start_time", "max"))
    top = by_scale.sort_values(["configs", "size", "last"]).index[-1]
    return latest(runs[runs.scale == top], CELL)


def latest(runs: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One run per value of `keys`: the latest (a rerun replaces the older run)."""
    return runs.sort_values("start_time").drop_duplicates(keys, keep="last")


def classified(runs: pd.DataFrame, allowed: set[str], required: set[str] = frozenset()) -> pd.DataFrame:
    """Runs outside a stress study whose treatment keys are all in allowed and include one of required (if any)."""
    keys = runs.overrides.map(treatments)
    ok = keys.map(lambda k: k is not None and k <= allowed and (not required or bool(k & required))).astype(bool)
    return runs[ok & runs.stress.isna()]


def baseline_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Every config at its own settings (whatever the seed or scale), at one scale (main_scale)."""
    return baseline_split(runs)[0]


def baseline_split(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """baseline_runs, and the runs of the same scale left out of them: a config's own settings are those of its latest
    run, so runs made before its config file was edited (or from a same-named file elsewhere) are never pooled with them
    as if they were more seeds (the overrides tag is relative to the file)."""
    base = main_scale(classified(runs, set()))
    values = treatment_values(base)
    latest_values = values.groupby(base.config).last().loc[base.config]  # main_scale sorted them by start time
    same = (values.values == latest_values.values).all(axis=1)
    return base[same], base[~same]


def lr_grid(runs: pd.DataFrame, min_lrs: int = MIN_GRID_LRS) -> pd.DataFrame:
    """Runs that change at most the LR, at the largest scale where a config has min_lrs LRs (else 2, else the largest)."""
    grid = classified(runs, {LR_KEY})
    scales = sorted(grid.groupby("scale"), key=lambda g: -(g[1].epochs * g[1].train_images).max())
    for need in (min_lrs, 2):
        for _, at in scales:
            at = main_scale(at)
            if at.groupby("config").lr.nunique().max() >= need:
                return at
    return main_scale(grid)


def sized_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs that change the model size (and maybe LR and warmup), of any config and scale."""
    return classified(runs, SIZE_ALLOWED, set(SIZE_KEYS))


def size_sweep(runs: pd.DataFrame) -> pd.DataFrame:
    """One config's size-changing runs, with its runs at its own size, one scale: the config with the most of them
    (two configs' sizes can share a parameter count, so they are never pooled)."""
    at = main_scale(sized_runs(runs))
    if at.empty:
        return at
    at = at[at.config == at.config.value_counts().idxmax()]
    same = classified(runs, SIZE_ALLOWED)
    same = same[same.config.isin(at.config) & same.scale.isin(at.scale) & same.seed.isin(at.seed) & same.lr.isin(at.lr)
                & same.warmup_epochs.isin(at.warmup_epochs)]  # the sweep's own grid at the config's own size
    return main_scale(same)


def treatment_values(runs: pd.DataFrame) -> pd.DataFrame:
    """The runs' TREATMENT_COLUMNS as text, a value a run did not log as "none" (so that two such runs compare equal)."""
    return runs[TREATMENT_COLUMNS].astype(str).fillna("none")


def own_lr(runs: pd.DataFrame, config: str) -> float:
    """The config's own LR: from its baseline runs, else from its config file; NaN if neither (a config given as a
    file elsewhere: its runs keep only its name), so that config has no x100 row."""
    base = classified(runs, set())
    at = base[base.config == config].sort_values("start_time").lr.dropna()
    if len(at):
        return float(at.iloc[-1])  # its latest run's, as baseline_split takes: the config file may have changed since
    try:
        return load_config(config, CONFIGS_DIR).optim.lr
    except ConfigError:
        return float("nan")


def outcome(run, ratio: float = CONVERGE_RATIO) -> str:
    """One rule for grid runs and stress trials: diverged, converged (final < ratio x step-0 loss) or did not converge."""
    if run.diverged:
        return f"diverged at step {int(run.diverged_step)}" if pd.notna(run.diverged_step) else "diverged"
    return "converged" if converged(run.final_loss, run.initial_loss, ratio) else "did not converge"
