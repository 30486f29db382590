"""An LR range test as one MLflow run: its curve per update, its figure, its suggestions as tags."""
from __future__ import annotations

import contextlib
import os

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

from .config import Config, ConfigError, to_params
from .delivery import first_line, metrics_op, send
from .stop import process_id
from .tracking import PROCESS_TAG, SEED_TAG, check_tracking, ready_store
from .ui import mark_training

LR_FIND_TAG = "lr_find"  # on a range-test run: its config's name (not CONFIG_TAG: the analysis must not read it as a training)
LR_FIND_BLOWUP_TAG = f"{LR_FIND_TAG}.blowup_lr"  # the LR where its loss blew up; "none" if it never did


def check_experiment(experiment: str) -> None:
    """A store the test cannot log to, or an experiment it cannot log into (deleted, an invalid name), refused in one
    line before the test runs (inside `mlflow run` it logs into the project's run)."""
    check_tracking()
    ready_store()
    if os.environ.get("MLFLOW_RUN_ID"):
        return
    try:
        mlflow.set_experiment(experiment)
    except MlflowException as e:
        raise ConfigError(f"--experiment {experiment!r}: {first_line(e)}") from None


def log_range_test(cfg: Config, data_md5: dict[str, str], result, experiment: str, parent_run_id: str | None = None) -> str:
    """One FINISHED MLflow run for an LR range test: the config as params, loss and smoothed loss per step (step = update,
    the LR as `lr_find/lr`), the figure, and the suggestions as tags; nested under parent_run_id if given; returns its id."""
    ready_store()
    client = MlflowClient()
    run_id = None if parent_run_id else os.environ.get("MLFLOW_RUN_ID")  # in `mlflow run . -e lr_find`: the project's run
    if not run_id:
        nested = {MLFLOW_PARENT_RUN_ID: parent_run_id} if parent_run_id else {}
        run_id = client.create_run(mlflow.set_experiment(experiment).experiment_id, run_name=f"lr-find {cfg.name}",
                                   tags=nested).info.run_id
    try:
        log_range_run(client, run_id, cfg, data_md5, result)
    except BaseException as e:  # the store failed partway, or a signal: the run must not stay RUNNING
        with contextlib.suppress(Exception):
            client.set_terminated(run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
        raise
    return run_id


def log_range_run(client: MlflowClient, run_id: str, cfg: Config, data_md5: dict[str, str], result) -> None:
    """Write a range test's params, tags, curve and figure to its run, and end it FINISHED."""
    from .lr_find import figure

    mark_training(client, run_id)
    tags = {LR_FIND_TAG: cfg.name, SEED_TAG: cfg.seed, PROCESS_TAG: process_id(), "lr_find.steepest_lr": result.steepest_lr,
            "lr_find.min_over_10_lr": result.min_over_10_lr, LR_FIND_BLOWUP_TAG: result.blowup_lr or "none",
            **{f"data_md5.{k}": v for k, v in data_md5.items()}}
    client.log_batch(run_id, params=[Param(k, v) for k, v in to_params(cfg).items()],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)
    rows = [(i, {"lr_find/lr": lr, "lr_find/loss": loss, "lr_find/smoothed_loss": sm})
            for i, (lr, loss, sm) in enumerate(zip(result.lrs, result.losses, result.smoothed))]
    for op in metrics_op(rows):
        send(client, run_id, op)
    fig = figure(result)
    client.log_figure(run_id, fig, "lr_find.png")
    fig.clf()
    client.set_terminated(run_id, "FINISHED")
