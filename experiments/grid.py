"""A sweep's grid: cells from comma lists, their keys, their config overrides and the study's name."""
from __future__ import annotations

import argparse
import hashlib
import itertools
import json

import optuna

from cookbook import resources
from cookbook.config import CONFIGS_DIR, available_configs, flag_overrides, load_config
from cookbook.data import ensure_mnist
from experiments.pruning import NO_PRUNER
from experiments.storage import SweepError, open_storage

GRID = ("config", "seed", "lr", "width", "depth", "warmup_epochs")  # cell fields, in key order
LIST_FLAGS = ("configs", "seeds", "lrs", "widths", "depths", "warmup_epochs")  # the flags that take comma lists: the grid
TRAIN_FLAGS = ("epochs", "batch_size", "train_subset", "test_subset", "device", "data_dir", "precision")  # shared by every cell
INT_FLAGS = ("epochs", "batch_size", "train_subset", "test_subset")


def parse_list(text: str | None, kind: type, name: str) -> list:
    """'1e-3,3e-3' -> [0.001, 0.003]; empty -> [None] (= as each config says)."""
    if text in (None, ""):
        return [None]
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"{name}={text!r}: every value must be a {kind.__name__}") from None
    if not values:
        raise SweepError(f"{name}={text!r} is an empty list")
    return values


def config_names(text: str) -> list[str]:
    """A comma list of config names, each one a file in experiments/configs/."""
    names, known = parse_list(text, str, "configs"), available_configs(CONFIGS_DIR)
    for name in names:
        if name not in known:
            raise SweepError(f"unknown config '{name}' in configs; available: {', '.join(known)}")
    return names


def train_settings(args: argparse.Namespace) -> dict:
    """The training flags given on the command line (one value each, shared by every cell or trial), typed."""
    settings = {f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f) not in (None, "")}
    for field in INT_FLAGS:
        if field in settings:
            values = parse_list(settings[field], int, field)
            if len(values) != 1:
                raise SweepError(f"{field}={settings[field]!r} takes one value; the grid's lists are "
                                 f"{', '.join('--' + f.replace('_', '-') for f in LIST_FLAGS)}")
            settings[field] = values[0]
    return settings


def make_cells(configs: str, seeds: str, lrs: str, widths: str = "", depths: str = "", warmups: str = "",
               settings: dict | None = None) -> list[dict]:
    """Every combination of the lists, each checked by resolving its config with the sweep's training settings (bad
    values fail here, before any work; a warmup is checked against the epochs the sweep trains, not the file's)."""
    lists = [config_names(configs), parse_list(seeds, int, "seeds"), parse_list(lrs, float, "lrs"), parse_list(widths, float, "widths"),
             parse_list(depths, int, "depths"), parse_list(warmups, float, "warmup_epochs")]
    cells = [dict(zip(GRID, combo)) for combo in itertools.product(*lists)]
    keys = [cell_key(c) for c in cells]
    repeated = next((k for k in keys if keys.count(k) > 1), None)
    if repeated:  # the queue holds one trial per key: the second could never be done, and the sweep never finished
        raise SweepError(f"the grid has cell '{repeated}' more than once (a repeated value, or two equal to 6 digits); "
                         "give each value once")
    for cell in cells:
        load_config(cell["config"], CONFIGS_DIR, overrides(cell, settings or {}))
    return cells


def check_cells(cells: list[dict], settings: dict) -> None:
    """Every cell's config with the shared settings is valid and fits this machine's device, and its data folder holds
    MNIST or can be given it (made there now, once, not by each worker): one line otherwise, before any store is made."""
    folders = set()
    for cell in cells:
        cfg = load_config(cell["config"], CONFIGS_DIR, overrides(cell, settings))
        resources.check(cfg)
        folders.add(cfg.data.data_dir)
    for folder in sorted(folders):
        ensure_mnist(folder)


def cell_key(cell: dict) -> str:
    """Stable readable id, e.g. 'all_tricks seed=0 lr=0.001' (fields left to the config are omitted; integers whole:
    seed 1000000 is not 1e+06)."""
    return " ".join([cell["config"]] + [f"{k}={cell[k]:d}" if isinstance(cell[k], int) else f"{k}={cell[k]:g}"
                                        for k in GRID[1:] if cell.get(k) is not None])


def group_key(cell: dict) -> str:
    """Cells with the same group key differ only in seed and can train as one stacked model."""
    return cell_key({**cell, "seed": None})


def overrides(cell: dict, settings: dict) -> dict:
    """Nested config overrides for one cell plus the sweep-wide training settings."""
    return flag_overrides({k: v for k, v in {**settings, **cell}.items() if k != "config"})


def spec_name(prefix: str, spec, digits: int) -> str:
    """Same spec -> same study name, which is what makes a rerun resume."""
    return f"{prefix}-{hashlib.sha1(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:digits]}"


def study_name(cells: list[dict], settings: dict, pruner: str = NO_PRUNER) -> str:
    """The sweep's study: named by its grid (its cells in key order: the same lists in another order are the same
    sweep), settings and pruner (no pruner keeps the names earlier sweeps had)."""
    return given_order_name(sorted(cells, key=cell_key), settings, pruner)


def sweep_name(storage: str, cells: list[dict], settings: dict, pruner: str = NO_PRUNER) -> str:
    """The grid's study name; or, where the storage holds a study of the same grid named by the order its lists were
    given (the names sweeps had before), that one, so that an earlier sweep resumes instead of training every cell again."""
    earlier = given_order_name(cells, settings, pruner)
    return earlier if earlier in optuna.get_all_study_names(open_storage(storage)) else study_name(cells, settings, pruner)


def given_order_name(cells: list[dict], settings: dict, pruner: str = NO_PRUNER) -> str:
    """The name of a study of these cells in this order: what sweeps were named before names sorted the grid."""
    return spec_name("sweep", [cells, settings] + ([pruner] if pruner != NO_PRUNER else []), 10)
