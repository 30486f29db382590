"""Read what MLflow tracked into tidy tables; nothing here trains or recomputes a run."""
from __future__ import annotations

import io
import json
import sys

import mlflow
import pandas as pd
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from sqlalchemy.exc import SQLAlchemyError

from cookbook import tracking as t
from cookbook.config import PARAM_PREFIX
from cookbook.delivery import first_line
from cookbook.range_run import LR_FIND_BLOWUP_TAG, LR_FIND_TAG
from cookbook.tracking import store_unreadable
from cookbook.train import EPOCH_LOSS, TEST_ACC, TEST_LOSS
from experiments.storage import STRESS_TAG, SWEEP_TAG
from experiments.stress_report import STRESS_REPORT, STRESS_RUN

KEYS = {"lr": "optim.lr", "width": "model.width", "depth": "model.depth", "warmup_epochs": "schedule.warmup_epochs",
        "max_norm": "optim.max_norm", "norm": "model.norm", "epochs": "epochs", "precision": "compute.precision",
        "batch_size": "data.batch_size", "train_subset": "data.train_subset", "test_subset": "data.test_subset",
        "init": "model.init", "optimizer": "optim.name", "weight_decay": "optim.weight_decay", "momentum": "optim.momentum",
        "schedule": "schedule.kind", "lr_min": "schedule.lr_min"}
# What a run must carry for any section to place it (its seed, its scale); a run without one is left out, said in a line
REQUIRED = {"the seed tag": f"tags.{t.SEED_TAG}", **{f"param {PARAM_PREFIX}{KEYS[k]}": f"params.{PARAM_PREFIX}{KEYS[k]}"
                                                     for k in ("epochs", "batch_size")}}
NUMERIC = ("lr", "width", "depth", "warmup_epochs", "epochs", "batch_size", "train_subset", "test_subset", "weight_decay",
           "momentum", "lr_min")


class AnalysisError(RuntimeError):
    """The experiment cannot be analysed at all (missing, or no finished training runs)."""


# What a reading command refuses in one line (exit 2): its own errors, and a store that cannot be read (an MLflow error,
# a file that is not a database, which SQLAlchemy raises as it is, a folder that cannot be written)
READ_ERRORS = (AnalysisError, MlflowException, SQLAlchemyError, OSError)


def refusal(error: Exception) -> str:
    """The one line a reading command prints for one of READ_ERRORS."""
    return f"error: {error if isinstance(error, AnalysisError) else first_line(error)}"


def check_store() -> None:
    """Refuse a SQLite store that does not exist before MLflow makes an empty one there."""
    if why := store_unreadable(mlflow.get_tracking_uri()):
        raise AnalysisError(why)


def training_runs(experiment: str) -> pd.DataFrame:
    """One row per FINISHED training run (a run with a `config` tag, not stopped by a pruner): identity, config values
    and final metrics."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise AnalysisError(f"no experiment '{experiment}' in {mlflow.get_tracking_uri()}; experiments: {names}")
    if exp.lifecycle_stage == "deleted":  # found by name all the same, its runs too: a report of what the user threw away
        raise AnalysisError(f"experiment '{experiment}' is deleted in {mlflow.get_tracking_uri()}; restore it first "
                            f"(`mlflow experiments restore --experiment-id {exp.experiment_id}`)")
    runs = mlflow.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    config_col = f"tags.{t.CONFIG_TAG}"
    if config_col in runs:
        runs = runs[runs[config_col].notna()]
    if f"tags.{t.PRUNED_TAG}" in runs:  # a trial the pruner stopped is shorter than its study says: no final result
        runs = runs[runs[f"tags.{t.PRUNED_TAG}"] != "true"]
    if runs.empty or config_col not in runs:
        raise AnalysisError(f"experiment '{experiment}' has no finished training runs (a run the pruner stopped has no "
                            "final result)")
    runs = complete(runs, experiment)
    col = lambda name: runs[name] if name in runs else pd.Series(None, index=runs.index, dtype=object)  # noqa: E731
    table = pd.DataFrame({
        "run_id": runs["run_id"], "run_name": col("tags.mlflow.runName"), "config": runs[config_col],
        "start_time": runs["start_time"], "overrides": col(f"tags.{t.OVERRIDES_TAG}"),
        "seed": col(f"tags.{t.SEED_TAG}").map(int),  # Python ints: a seed may exceed int64 (up to 2**64-1)
        "param_count": pd.to_numeric(col(f"tags.{t.PARAM_COUNT_TAG}")),
        "diverged": col(f"tags.{t.DIVERGED_TAG}") == "true", "diverged_step": pd.to_numeric(col(f"tags.{t.DIVERGED_STEP_TAG}")),
        "steps_run": pd.to_numeric(col(f"tags.{t.STEPS_RUN_TAG}")), "total_steps": pd.to_numeric(col(f"tags.{t.TOTAL_STEPS_TAG}")),
        "sweep": col(f"tags.{SWEEP_TAG}"), "stress": col(f"tags.{STRESS_TAG}"),
        **{k: col(f"params.{PARAM_PREFIX}{v}") for k, v in KEYS.items()},
        "final_loss": col(f"metrics.{EPOCH_LOSS}"), "test_loss": col(f"metrics.{TEST_LOSS}"),
        "test_acc": col(f"metrics.{TEST_ACC}"),
    })
    for name in NUMERIC:
        table[name] = pd.to_numeric(table[name].replace({"null": None}), errors="coerce")
    table["max_norm"] = pd.to_numeric(table["max_norm"].replace({"null": None}), errors="coerce")
    table.loc[table.diverged, ["final_loss", "test_loss", "test_acc"]] = float("nan")  # last values are pre-divergence
    return table.reset_index(drop=True)


def complete(runs: pd.DataFrame, experiment: str) -> pd.DataFrame:
    """The runs that carry every REQUIRED value; a one-line warning names how many others were left out and why (an
    AnalysisError where none is left)."""
    lacking = {why: runs[c].isna() if c in runs else pd.Series(True, index=runs.index) for why, c in REQUIRED.items()}
    bad = pd.concat(lacking, axis=1).any(axis=1)
    if not bad.any():
        return runs
    reasons = ", ".join(f"without {why}: {int(m.sum())}" for why, m in lacking.items() if m.any())
    if bad.all():
        raise AnalysisError(f"experiment '{experiment}' has no finished training run with a seed tag, epochs and batch size ({reasons})")
    print(f"warning: left out {int(bad.sum())} of {len(runs)} finished training runs of '{experiment}' ({reasons})", file=sys.stderr)
    return runs[~bad]


def history(run_id: str, key: str) -> pd.Series:
    """A metric's full history as a Series indexed by step."""
    points = MlflowClient().get_metric_history(run_id, key)
    return pd.Series({m.step: m.value for m in points}, dtype=float).sort_index()


def histories(run_ids: list[str], key: str) -> pd.DataFrame:
    """Tidy (run_id, step, value) rows of one metric for many runs."""
    frames = [history(r, key).rename("value").rename_axis("step").reset_index().assign(run_id=r) for r in run_ids]
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step", "value", "run_id"])


def snapshots(run_id: str) -> pd.DataFrame:
    """The run's grad_norms/snapshots.csv (step, param, numel, grad_norm, weight_norm); empty if absent."""
    try:
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/{t.SNAPSHOT_ARTIFACT}")
    except Exception:  # noqa: BLE001  (a run without the artifact: nothing to draw from it)
        return pd.DataFrame(columns=t.SNAPSHOT_COLUMNS)
    return pd.read_csv(io.StringIO(text))


def stress_reports(experiment: str) -> list[dict]:
    """Every stress_report.json logged by a stress parent run in the experiment (latest first)."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    parents = mlflow.search_runs([exp.experiment_id], f"attributes.run_name = '{STRESS_RUN}' and attributes.status = 'FINISHED'")
    reports = []
    for run_id in parents.get("run_id", []):
        try:
            reports += json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/{STRESS_REPORT}"))
        except Exception:  # noqa: BLE001  (a stress run still in progress has no report yet)
            continue
    return reports


def range_tests(experiment: str) -> pd.DataFrame:
    """One row per FINISHED LR range-test run (tag lr_find): config, blow-up LR (NaN: it never blew up), training images
    and batch size, start time, run id."""
    exp = mlflow.get_experiment_by_name(experiment)
    runs = mlflow.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'") if exp else pd.DataFrame()
    tag = f"tags.{LR_FIND_TAG}"
    if runs.empty or tag not in runs:
        return pd.DataFrame(columns=["run_id", "config", "blowup_lr", "train_subset", "batch_size", "start_time"])
    runs = runs[runs[tag].notna()]
    param = lambda key: pd.to_numeric(runs[f"params.{PARAM_PREFIX}{key}"].replace({"null": None}), errors="coerce")  # noqa: E731
    return pd.DataFrame({"run_id": runs.run_id, "config": runs[tag],
                         "blowup_lr": pd.to_numeric(runs[f"tags.{LR_FIND_BLOWUP_TAG}"], errors="coerce"),  # "none": NaN
                         "train_subset": param("data.train_subset"), "batch_size": param("data.batch_size"),
                         "start_time": runs.start_time}).reset_index(drop=True)
