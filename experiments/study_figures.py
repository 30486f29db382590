"""Study-level figures on a sweep's parent run: which swept key matters for the final loss, and every cell at a glance."""
from __future__ import annotations

import math
import sys

import matplotlib.pyplot as plt
import mlflow
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.visualization import matplotlib as optuna_plots

from experiments.grid import GRID

CHANCE_LOSS = math.log(10)  # a diverged cell counts as no better than guessing among 10 classes (as in the report)
FIGURES = {"study/param_importances.png": optuna_plots.plot_param_importances,
           "study/parallel_coordinates.png": optuna_plots.plot_parallel_coordinate}


def cells_study(table: pd.DataFrame) -> optuna.Study | None:
    """An in-memory study of the finished cells: the swept keys (those with more than one value) as params, the final
    train loss as value (a diverged cell: CHANCE_LOSS). None when nothing was swept or fewer than 2 cells finished."""
    if table.empty:
        return None
    keys = [k for k in GRID if table[k].nunique(dropna=False) > 1]
    if not keys or len(table) < 2:
        return None
    cells = table.astype(object).where(table.notna(), None)  # None = "as the config says"
    dists = {k: CategoricalDistribution(sorted(set(cells[k]), key=lambda v: (v is not None, str(v)))) for k in keys}
    study = optuna.create_study(study_name="cells")
    for _, cell in cells.iterrows():
        value = CHANCE_LOSS if cell.diverged or cell.final_loss is None else min(float(cell.final_loss), CHANCE_LOSS)
        study.add_trial(optuna.trial.create_trial(params={k: cell[k] for k in keys}, distributions=dists, value=value))
    return study


def log_study_figures(table: pd.DataFrame) -> list[str]:
    """Log parameter importances and parallel coordinates of the cells to the active (parent) run; the names logged.
    The sweep's results are already stored: a figure that cannot be drawn is one line on stderr, not an error."""
    study = cells_study(table)
    if study is None:
        return []
    logged = []
    for name, plot in FIGURES.items():
        try:
            axes = plot(study)
            mlflow.log_figure(axes.figure, name)
            plt.close(axes.figure)
            logged.append(name)
        except Exception as e:  # noqa: BLE001  (e.g. importances need two distinct values)
            print(f"[sweep] {name} not drawn: {type(e).__name__}: {e}", file=sys.stderr)
    return logged
