"""Study-level figures of a sweep's cells: the in-memory study behind them and the figures on the parent run."""
import math

import mlflow
import pandas as pd
from mlflow import MlflowClient

from experiments.study_figures import CHANCE_LOSS, cells_study, log_study_figures


def table(rows):
    cols = ["config", "seed", "lr", "width", "depth", "warmup_epochs", "final_loss", "diverged"]
    return pd.DataFrame([dict(zip(cols, r)) for r in rows])


CELLS = table([("no_tricks", 0, 1e-3, None, None, None, 0.2, False), ("no_tricks", 0, 1e-1, None, None, None, None, True),
               ("all_tricks", 0, 1e-3, None, None, None, 0.05, False), ("all_tricks", 0, 1e-1, None, None, None, 0.9, False)])


def test_swept_keys_are_the_params_and_a_diverged_cell_counts_as_chance():
    study = cells_study(CELLS)
    assert [sorted(t.params) for t in study.trials] == [["config", "lr"]] * 4  # seed, width... were not swept
    assert [t.value for t in study.trials] == [0.2, CHANCE_LOSS, 0.05, 0.9] and CHANCE_LOSS == math.log(10)
    assert cells_study(CELLS.iloc[:1]) is None and cells_study(CELLS.iloc[:0]) is None


def test_figures_are_logged_to_the_active_run(tracking):
    mlflow.set_experiment("figures")  # not whichever experiment an earlier test left active
    with mlflow.start_run() as run:
        assert log_study_figures(CELLS) == ["study/param_importances.png", "study/parallel_coordinates.png"]
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "study")}
    assert names == {"study/param_importances.png", "study/parallel_coordinates.png"}
