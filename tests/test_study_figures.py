"""Study-level figures: a sweep's cells (the in-memory study behind them) and a stress study's history, on the parent run."""
import math
import warnings

import mlflow
import optuna
import pandas as pd
from mlflow import MlflowClient
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from experiments.study_figures import CHANCE_LOSS, cells_study, log_stress_history, log_study_figures, stress_history


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
    pruned = cells_study(CELLS.assign(pruned=[False, False, False, True]))  # a cell the pruner stopped has no final loss
    assert [t.value for t in pruned.trials] == [0.2, CHANCE_LOSS, 0.05]


def test_figures_are_logged_to_the_active_run(tracking):
    mlflow.set_experiment("figures")  # not whichever experiment an earlier test left active
    with mlflow.start_run() as run:
        assert log_study_figures(CELLS) == ["study/param_importances.png", "study/parallel_coordinates.png"]
    names = {a.path for a in MlflowClient().list_artifacts(run.info.run_id, "study")}
    assert names == {"study/param_importances.png", "study/parallel_coordinates.png"}


def stress_study():
    """Four finished trials of a stress study: two converged (value = log10 LR), two failed (one below the range)."""
    study = optuna.create_study(direction="maximize")
    dist = {"log10_lr": FloatDistribution(-3, 0)}
    for log_lr, ok in ((-3.0, True), (-2.0, True), (-1.0, False), (-0.5, False)):
        trial = optuna.trial.create_trial(params={"log10_lr": log_lr}, distributions=dist, user_attrs={"converged": ok},
                                          value=log_lr if ok else -4.0, state=TrialState.COMPLETE)
        study.add_trial(trial)
    return study


def test_stress_history_marks_the_boundary_and_every_failed_trial(tracking):
    study = stress_study()
    report = {"config": "no_tricks", "boundary_lr": 0.03, "boundary_lr_90ci": [0.01, 0.09]}
    ax = stress_history(study, study.trials, report).axes[0]
    assert [list(line.get_ydata()) for line in ax.lines if line.get_linestyle() == "--"] == [[math.log10(0.03)] * 2]
    failed = [c for c in ax.collections if c.get_label().startswith("failed")]
    assert failed[0].get_offsets().tolist() == [[2, -1.0], [3, -0.5]]  # at their own LRs, not at the objective's -4
    mlflow.set_experiment("figures")
    with mlflow.start_run() as run:
        assert log_stress_history(study, study.trials, report) == "stress/no_tricks/optimization_history.png"
    assert [a.path for a in MlflowClient().list_artifacts(run.info.run_id, "stress/no_tricks")] == \
        ["stress/no_tricks/optimization_history.png"]


def test_a_stress_study_without_a_completed_trial_draws_without_warnings():
    study = optuna.create_study(direction="maximize")
    dist = {"log10_lr": FloatDistribution(-3, 0)}
    for log_lr in (-1.0, -0.5):  # every trial stopped by the pruner: Optuna's own plot has nothing to label
        study.add_trial(optuna.trial.create_trial(params={"log10_lr": log_lr}, distributions=dist, state=TrialState.PRUNED))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ax = stress_history(study, study.trials, {"config": "no_tricks", "boundary_lr": None}).axes[0]
    assert [c.get_label() for c in ax.collections if c.get_label().startswith("failed")]
