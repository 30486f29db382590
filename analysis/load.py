"""Read what MLflow tracked into tidy tables; nothing here trains or recomputes a run."""
from __future__ import annotations

import io
import json

import mlflow
import pandas as pd
from mlflow import MlflowClient

PARAMS = {"lr": "config.optim.lr", "width": "config.model.width", "depth": "config.model.depth",
          "warmup_epochs": "config.schedule.warmup_epochs", "max_norm": "config.optim.max_norm",
          "norm": "config.model.norm", "epochs": "config.epochs", "precision": "config.compute.precision"}
NUMERIC = ("lr", "width", "depth", "warmup_epochs", "epochs")


class AnalysisError(RuntimeError):
    """The experiment cannot be analysed at all (missing, or no finished training runs)."""


def training_runs(experiment: str) -> pd.DataFrame:
    """One row per FINISHED training run (a run with a `config` tag): identity, config values and final metrics."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        names = ", ".join(e.name for e in mlflow.search_experiments()) or "none"
        raise AnalysisError(f"no experiment '{experiment}' in {mlflow.get_tracking_uri()}; experiments: {names}")
    runs = mlflow.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    if runs.empty or "tags.config" not in runs or runs["tags.config"].isna().all():
        raise AnalysisError(f"experiment '{experiment}' has no finished training runs")
    runs = runs[runs["tags.config"].notna()]
    col = lambda name: runs[name] if name in runs else pd.Series(None, index=runs.index, dtype=object)  # noqa: E731
    table = pd.DataFrame({
        "run_id": runs["run_id"], "run_name": col("tags.mlflow.runName"), "config": runs["tags.config"],
        "seed": col("tags.seed").astype(int), "param_count": pd.to_numeric(col("tags.param_count")),
        "diverged": col("tags.diverged") == "true", "diverged_step": pd.to_numeric(col("tags.diverged_step")),
        "steps_run": pd.to_numeric(col("tags.steps_run")), "total_steps": pd.to_numeric(col("tags.total_steps")),
        "sweep": col("tags.sweep"), "stress": col("tags.stress"),
        **{k: col(f"params.{v}") for k, v in PARAMS.items()},
        "final_loss": col("metrics.epoch/train_loss"), "test_loss": col("metrics.test/loss"),
        "test_acc": col("metrics.test/acc"),
    })
    for name in NUMERIC:
        table[name] = pd.to_numeric(table[name], errors="coerce")
    table["max_norm"] = pd.to_numeric(table["max_norm"].replace({"null": None}), errors="coerce")
    table.loc[table.diverged, ["final_loss", "test_loss", "test_acc"]] = float("nan")  # last values are pre-divergence
    return table.reset_index(drop=True)


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
        text = mlflow.artifacts.load_text(f"runs:/{run_id}/grad_norms/snapshots.csv")
    except Exception:  # noqa: BLE001  (a run without the artifact: nothing to draw from it)
        return pd.DataFrame(columns=["step", "param", "numel", "grad_norm", "weight_norm"])
    return pd.read_csv(io.StringIO(text))


def stress_reports(experiment: str) -> list[dict]:
    """Every stress_report.json logged by a stress parent run in the experiment (latest first)."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        return []
    parents = mlflow.search_runs([exp.experiment_id], "attributes.run_name = 'stress' and attributes.status = 'FINISHED'")
    reports = []
    for run_id in parents.get("run_id", []):
        try:
            reports += json.loads(mlflow.artifacts.load_text(f"runs:/{run_id}/stress_report.json"))
        except Exception:  # noqa: BLE001  (a stress run still in progress has no report yet)
            continue
    return reports
