"""A sweep cell's earlier run, the one a failed trial of its own named: one that stopped after an epoch is trained on from
its checkpoint, one that a killed trial left finished (or stopped by the pruner) is the cell's result."""
from __future__ import annotations

from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from cookbook.checkpoint import load as load_checkpoint
from cookbook.config import ConfigError
from cookbook.resume import resumable
from cookbook.train import EPOCH_LOSS, TrainResult
from experiments.adopt import adopt, epoch_losses, orphaned_run
from experiments.grid import cell_key
from experiments.storage import QUEUED_CELL_ATTR, RUN_ID_ATTR


def stopped_run(trial: optuna.Trial, cell: str) -> str | None:
    """The latest unfinished run a failed trial of this cell left, with a checkpoint here, if any: only a run this study's
    own trials name (a same-named sweep in another storage tags its runs alike)."""
    client = MlflowClient()
    failed = [t for t in trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
              if t.user_attrs.get(QUEUED_CELL_ATTR) == cell and t.user_attrs.get(RUN_ID_ATTR)]
    for run_id in dict.fromkeys(t.user_attrs[RUN_ID_ATTR] for t in sorted(failed, key=lambda t: -t.number)):
        try:
            run, _ = resumable(client, run_id)
        except ConfigError:  # finished, still running elsewhere, no checkpoint, or in another store: not this one
            continue
        if run.info.lifecycle_stage != "deleted":  # the UI's delete: the cell is to be trained afresh
            return run_id
    return None


def record_result(trial: optuna.Trial, result: TrainResult) -> float:
    """Store the outcome on the trial; the objective value is the final train loss (inf if it diverged)."""
    trial.set_user_attr("diverged", result.diverged)
    trial.set_user_attr("steps_run", result.steps_run)
    for name, value in result.final.items():
        trial.set_user_attr(name, value)
    return float("inf") if result.diverged else result.final[EPOCH_LOSS]


def adopted(trial: optuna.Trial, cell: dict) -> float | None:
    """The objective value of the FINISHED run a failed trial of this cell left (killed after its run ended, before
    Optuna heard: its retry must not train the cell twice), recorded on the trial; a run the pruner stopped raises
    TrialPruned."""
    key = cell_key(cell)
    found = orphaned_run(trial, lambda failed: failed.user_attrs.get(QUEUED_CELL_ATTR) == key)
    if found is None:
        return None
    adopt(trial, found)
    return record_result(trial, found.result)


def tell_adopted(study: optuna.Study, trial: optuna.Trial, cell: dict) -> bool:
    """Tell the trial its cell's stored outcome (see adopted), if it has one; whether it had."""
    try:
        value = adopted(trial, cell)
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return True
    if value is not None:
        study.tell(trial, value)
    return value is not None


def report_stored_epochs(trial: optuna.Trial, run_id: str, checkpoint: Path) -> None:
    """A cell continued from its checkpoint: the epochs trained before it reach the trial as intermediate values too
    (the pruner compares trials epoch by epoch; training reports only the epochs it runs now)."""
    if checkpoint.is_file():
        for epoch, loss in sorted(epoch_losses(MlflowClient(), run_id, load_checkpoint(checkpoint)["epoch"]).items()):
            trial.report(loss, step=epoch)
