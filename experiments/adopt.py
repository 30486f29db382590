"""A trial's outcome taken from the FINISHED MLflow run an earlier trial left: a worker killed after its run ended and
before Optuna's tell() leaves that trial failed and queued again, and its retry takes the run instead of training twice."""
from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import optuna
from mlflow import MlflowClient
from mlflow.entities import Run
from mlflow.exceptions import MlflowException
from optuna.trial import FrozenTrial, TrialState

from cookbook.monitor import STEP_LOSS
from cookbook.spooled import pending_spool, store_spool
from cookbook.tracking import DIVERGED_STEP_TAG, DIVERGED_TAG, PRUNED_TAG, STEPS_RUN_TAG, TOTAL_STEPS_TAG
from cookbook.train import EPOCH_LOSS, SUMMARY_KEYS, TrainResult
from experiments.storage import PRUNED_ATTR, RUN_ID_ATTR, TRIAL_TAG


class StoredRun(NamedTuple):
    """A FINISHED run's outcome: its id, its result, its finite epoch losses, the epoch the pruner stopped it after."""

    run_id: str
    result: TrainResult
    epoch_losses: dict[int, float]
    pruned_at: int | None  # None: it was not pruned


def epoch_losses(client: MlflowClient, run_id: str, through: int | None = None) -> dict[int, float]:
    """The run's finite epoch losses by epoch (up to `through`, if given)."""
    return {p.step: p.value for p in client.get_metric_history(run_id, EPOCH_LOSS)
            if math.isfinite(p.value) and (through is None or p.step <= through)}


def stored_run(client: MlflowClient, run: Run) -> StoredRun | None:
    """What a FINISHED run recorded of its training; None where its outcome is not all there (no steps_run tag, or
    neither diverged nor a last epoch's loss)."""
    tags, metrics = run.data.tags, run.data.metrics
    diverged = tags.get(DIVERGED_TAG) == "true"
    if STEPS_RUN_TAG not in tags or not (diverged or EPOCH_LOSS in metrics):
        return None
    losses = epoch_losses(client, run.info.run_id)
    pruned = tags.get(PRUNED_TAG) == "true"
    if pruned and not losses:  # the epoch it stopped after is the last one it stored
        return None
    result = TrainResult(steps_run=int(tags[STEPS_RUN_TAG]), total_steps=int(tags.get(TOTAL_STEPS_TAG, 0)), diverged=diverged,
                         diverged_step=int(tags[DIVERGED_STEP_TAG]) if diverged else None,
                         final={k: metrics[k] for k in SUMMARY_KEYS if k in metrics})
    return StoredRun(run.info.run_id, result, losses, max(losses) if pruned else None)


def adopt(trial: optuna.Trial, stored: StoredRun) -> None:
    """Record the run on the trial as its training would have (run id, total steps, divergence step, each epoch's loss
    as an intermediate value); a run the pruner stopped raises TrialPruned, with the epoch it stopped after."""
    trial.set_user_attr(RUN_ID_ATTR, stored.run_id)
    trial.set_user_attr("total_steps", stored.result.total_steps)
    if stored.result.diverged:
        trial.set_user_attr("diverged_step", stored.result.diverged_step)
    for epoch, loss in sorted(stored.epoch_losses.items()):
        trial.report(loss, step=epoch)
    if stored.pruned_at is not None:
        trial.set_user_attr(PRUNED_ATTR, stored.pruned_at)
        trial.set_user_attr("steps_run", stored.result.steps_run)
        raise optuna.TrialPruned(f"pruned after epoch {stored.pruned_at}, as its run {stored.run_id} recorded")


def orphaned_run(trial: optuna.Trial, same: Callable[[FrozenTrial], bool]) -> StoredRun | None:
    """The FINISHED run a failed trial of this study left (killed after its run ended, before tell(), or its end spooled
    through a store outage: stored first), for a failed trial that `same` picks (its point or cell), retagged as this
    trial's; None if there is none. Only the run the failed trial names, and only while its trial tag is still that
    trial's: a run of another study or storage, or one a retry took already, is never taken."""
    client = MlflowClient()
    for failed in trial.study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        run_id = failed.user_attrs.get(RUN_ID_ATTR)
        if not run_id or not same(failed):
            continue
        try:
            run = client.get_run(run_id)
        except MlflowException:  # the run is in another store (the study moved)
            continue
        mine = run.data.tags.get(TRIAL_TAG) == str(failed.number) and run.info.lifecycle_stage == "active"
        if mine and run.info.status == "RUNNING" and (spool := pending_spool(run)):  # its end waited out an outage:
            store_spool(spool, client.tracking_uri)  # stored now (as `sync` would), a finished run is taken, a stopped one
            run = client.get_run(run_id)  # resumed from its checkpoint (resume_cells.stopped_run)
        if mine and run.info.status == "FINISHED" and (stored := stored_run(client, run)) is not None:
            client.set_tag(run_id, TRIAL_TAG, str(trial.number))  # the trial that holds it now
            return stored
    return None


def initial_loss(client: MlflowClient, run_id: str) -> float:
    """The run's first stored step loss (NaN if it has none)."""
    points = client.get_metric_history(run_id, STEP_LOSS)
    return min(points, key=lambda p: p.step).value if points else float("nan")
