"""A sweep cell's earlier run, found by its tags: one that stopped after an epoch is trained on from its checkpoint, one
that finished is the cell's result."""
from __future__ import annotations

import math
from pathlib import Path

import optuna
from mlflow import MlflowClient

from cookbook.checkpoint import load as load_checkpoint
from cookbook.config import ConfigError
from cookbook.resume import resumable
from cookbook.tracking import DIVERGED_STEP_TAG, DIVERGED_TAG, PRUNED_TAG, STEPS_RUN_TAG, TOTAL_STEPS_TAG
from cookbook.train import EPOCH_LOSS, SUMMARY_KEYS, TrainResult
from experiments.storage import CELL_TAG, SWEEP_TAG


def stopped_run(client: MlflowClient, experiment: str, sweep: str, cell: str) -> str | None:
    """The latest run of this cell in this sweep that stopped unfinished and has a checkpoint here, if any."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    unfinished = f"tags.{SWEEP_TAG} = '{sweep}' and tags.{CELL_TAG} = '{cell}' and attributes.status != 'FINISHED'"
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], filter_string=unfinished)
    for run in runs:
        try:
            resumable(client, run.info.run_id)
        except ConfigError:  # still running elsewhere, or no checkpoint: not this one
            continue
        return run.info.run_id
    return None


def finished_result(client: MlflowClient, experiment: str, sweep: str, cell: str) -> tuple[str, TrainResult] | None:
    """The run id and result of this cell's FINISHED run in this sweep, if it has one: a worker stopped after the run
    ended and before Optuna heard of it (its trial failed and was queued again), so the cell is not trained twice.
    A run the pruner stopped is not taken (its trial needs the epoch it stopped at)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    finished = f"tags.{SWEEP_TAG} = '{sweep}' and tags.{CELL_TAG} = '{cell}' and attributes.status = 'FINISHED'"
    for run in client.search_runs([found.experiment_id], filter_string=finished, order_by=["attributes.start_time"]):
        tags, metrics = run.data.tags, run.data.metrics
        diverged = tags.get(DIVERGED_TAG) == "true"
        if tags.get(PRUNED_TAG) == "true" or STEPS_RUN_TAG not in tags or not (diverged or EPOCH_LOSS in metrics):
            continue
        return run.info.run_id, TrainResult(
            steps_run=int(tags[STEPS_RUN_TAG]), total_steps=int(tags.get(TOTAL_STEPS_TAG, 0)), diverged=diverged,
            diverged_step=int(tags[DIVERGED_STEP_TAG]) if diverged else None,
            final={k: metrics[k] for k in SUMMARY_KEYS if k in metrics})
    return None


def report_stored_epochs(trial: optuna.Trial, run_id: str, checkpoint: Path) -> None:
    """A cell continued from its checkpoint: the epochs trained before it reach the trial as intermediate values too
    (the pruner compares trials epoch by epoch; training reports only the epochs it runs now)."""
    if checkpoint.is_file():
        through = load_checkpoint(checkpoint)["epoch"]
        for point in MlflowClient().get_metric_history(run_id, EPOCH_LOSS):
            if point.step <= through and math.isfinite(point.value):
                trial.report(point.value, step=point.step)
