"""A stress study's LR search range: from the config's own LR to factor x it, or around an LR range test's blow-up."""
from __future__ import annotations

import math

from cookbook.config import CONFIGS_DIR, load_config
from cookbook.lr_find import START_LR, RangeTest, lr_range_test
from cookbook.range_run import log_range_test
from experiments.grid import overrides
from experiments.workers import cached_mnist

# From a range test: blow-up / 30 to blow-up x 30, three decades (as the default factor 1000), the blow-up in the middle,
# since whether full training diverges below or above it is what the study measures.
RANGE_FACTOR = 30.0
RANGE_ATTR = "log10_lr_range"  # spec key: the search range's log10 bounds when a range test set them
LR_FIND_RUN_ATTR, LR_FIND_BLOWUP_ATTR = "lr_find_run_id", "lr_find_blowup_lr"  # study attrs (and report keys): that test


def base_log_lr(config: str, settings: dict) -> float:
    """log10 of the config's own LR."""
    return math.log10(load_config(config, CONFIGS_DIR, overrides({}, settings)).optim.lr)


def search_range(spec: dict) -> tuple[float, float]:
    """log10 bounds of a study's LR search: as a range test set them, else the config's own LR to factor x it."""
    if RANGE_ATTR in spec:
        lo, hi = spec[RANGE_ATTR]
        return lo, hi
    base = base_log_lr(spec["config"], spec["settings"])
    return base, base + math.log10(spec["factor"])


def range_from_blowup(blowup_lr: float) -> tuple[float, float]:
    """log10 of [blow-up / RANGE_FACTOR, blow-up x RANGE_FACTOR], the low end clamped to the test's start LR (below it
    the test saw nothing)."""
    centre = math.log10(blowup_lr)
    return max(centre - math.log10(RANGE_FACTOR), math.log10(START_LR)), centre + math.log10(RANGE_FACTOR)


def run_range_test(config: str, settings: dict, seed: int, experiment: str, parent_run_id: str) -> tuple[RangeTest, str]:
    """The config's LR range test with the study's training settings, tracked as a run nested under the parent."""
    cfg = load_config(config, CONFIGS_DIR, overrides({"seed": seed}, settings))
    data = cached_mnist(cfg.data.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    result = lr_range_test(cfg, data)
    return result, log_range_test(cfg, data.md5, result, experiment, parent_run_id=parent_run_id)
