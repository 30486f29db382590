"""Study-level figures on a parent run: for a sweep, which swept key matters for the final loss and every cell at a glance;
for a stress study, its optimization history with the boundary marked."""
from __future__ import annotations

import math
import sys
import warnings

import matplotlib.pyplot as plt
import mlflow
import optuna
import pandas as pd
from optuna.distributions import CategoricalDistribution
from optuna.visualization import matplotlib as optuna_plots

from experiments.boundary import CHANCE_LOSS  # a diverged cell counts as no better than guessing (as in the report)
from experiments.grid import GRID

FIGURES = {"study/param_importances.png": optuna_plots.plot_param_importances,
           "study/parallel_coordinates.png": optuna_plots.plot_parallel_coordinate}


def cells_study(table: pd.DataFrame) -> optuna.Study | None:
    """An in-memory study of the finished cells: the swept keys (those with more than one value) as params, the final
    train loss as value (a diverged cell: CHANCE_LOSS). None when nothing was swept or fewer than 2 cells finished.
    Cells the pruner stopped are left out."""
    if "pruned" in table:
        table = table[~table.pruned.astype(bool)]  # a cell the pruner stopped has no final loss
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


def drawn(plot, study: optuna.Study):
    """plot(study) without Optuna's warning that its matplotlib plots are experimental (one per figure, every sweep), nor
    matplotlib's about the empty legend Optuna asks for when no trial completed (we add labelled artists after)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        warnings.filterwarnings("ignore", "No artists with labels found to put in legend", UserWarning)
        return plot(study)


def log_study_figures(table: pd.DataFrame) -> list[str]:
    """Log parameter importances and parallel coordinates of the cells to the active (parent) run; the names logged.
    The sweep's results are already stored: a figure that cannot be drawn is one line on stderr, not an error."""
    study = cells_study(table)
    if study is None:
        return []
    logged = []
    for name, plot in FIGURES.items():
        try:
            axes = drawn(plot, study)
            mlflow.log_figure(axes.figure, name)
            plt.close(axes.figure)
            logged.append(name)
        except Exception as e:  # noqa: BLE001  (e.g. importances need two distinct values)
            print(f"[sweep] {name} not drawn: {type(e).__name__}: {e}", file=sys.stderr)
    return logged


def stress_history(study: optuna.Study, trials: list[optuna.trial.FrozenTrial], report: dict):
    """Optuna's optimization history of a stress study (a converged trial's value is its log10 LR, a failed one's lies
    below the range), each failed trial of `trials` at its own log10 LR, and the boundary with its 90% interval."""
    ax = drawn(optuna_plots.plot_optimization_history, study)
    failed = [t for t in trials if not t.user_attrs.get("converged")]
    ax.scatter([t.number for t in failed], [t.params["log10_lr"] for t in failed], marker="x", color="tab:red",
               label="failed (diverged, pruned or not converged) at its log10 LR")
    if report.get("boundary_lr"):
        low, high = report["boundary_lr_90ci"]
        ax.axhspan(math.log10(low), math.log10(high), color="black", alpha=0.1, label="boundary's 90% interval")
        ax.axhline(math.log10(report["boundary_lr"]), color="black", linestyle="--",
                   label=f"boundary P(fail) = 0.5: LR {report['boundary_lr']:.3g}")
    ax.set(ylabel="log10 LR", title=f"LR stress {report['config']}: optimization history"
           + ("" if report.get("boundary_lr") else "\n(no boundary inside the range)"))
    ax.legend(fontsize=7)
    return ax.figure


def log_stress_history(study: optuna.Study, trials: list[optuna.trial.FrozenTrial], report: dict) -> str | None:
    """stress_history logged to the active (parent) run; its name, or None (one line on stderr) if it cannot be drawn."""
    name = f"stress/{report['config']}/optimization_history.png"
    try:
        fig = stress_history(study, trials, report)
    except Exception as e:  # noqa: BLE001  (the study's results are already stored)
        print(f"[stress] {name} not drawn: {type(e).__name__}: {e}", file=sys.stderr)
        return None
    mlflow.log_figure(fig, name)
    plt.close(fig)
    return name
