"""A sweep's results from its study records: one row per finished cell, and the one-screen summary."""
from __future__ import annotations

import optuna
import pandas as pd

from cookbook.train import EPOCH_LOSS, TEST_ACC
from experiments.grid import GRID
from experiments.storage import PRUNED_ATTR, RUN_ID_ATTR, recorded_trials


def summary(study: optuna.Study) -> pd.DataFrame:
    """One row per finished cell, from the study's records (a cell the pruner stopped has no final loss); a cell done
    twice (its deleted run restored after it was trained again) is its latest trial, as the analysis takes its latest run."""
    rows = []
    for t in sorted(recorded_trials(study), key=lambda t: t.number):
        diverged = t.user_attrs.get("diverged")  # then the last epoch's numbers are from before it blew up: not a result
        rows.append({**{k: t.user_attrs.get(k) for k in GRID},
                     "cell": t.params["cell"], "final_loss": None if diverged else t.user_attrs.get(EPOCH_LOSS),
                     "test_acc": None if diverged else t.user_attrs.get(TEST_ACC), "diverged": diverged,
                     "pruned": PRUNED_ATTR in t.user_attrs, RUN_ID_ATTR: t.user_attrs.get(RUN_ID_ATTR)})
    return pd.DataFrame(rows).drop_duplicates("cell", keep="last", ignore_index=True) if rows else pd.DataFrame()


def print_summary(table: pd.DataFrame, counts: dict, seconds: float) -> None:
    """One screen: mean final loss over seeds per cell of the grid but the seed, diverged and pruned cells counted."""
    print(f"\n{counts['done']}/{counts['total']} cells done in {seconds / 60:.1f} min")
    if table.empty:
        return
    by = [k for k in GRID if k != "seed"]
    table = table.assign(**{k: table[k].fillna("config") for k in by[1:]}, diverged=table.diverged.astype(bool))
    grouped = table.groupby(by, dropna=False).agg(
        seeds=("cell", "count"), final_loss=("final_loss", "mean"), test_acc=("test_acc", "mean"),
        diverged=("diverged", "sum"), pruned=("pruned", "sum"))
    print(grouped.reset_index().to_string(index=False, formatters={k: "{:.4f}".format for k in ("final_loss", "test_acc")}))
