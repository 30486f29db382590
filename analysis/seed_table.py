"""The seed's results table, measured: reads only what MLflow tracked and prints markdown.

    python -m analysis.seed_table [--experiment seed-table]
"""
from __future__ import annotations

import argparse

import mlflow
import pandas as pd
from mlflow import MlflowClient

from analysis.sections import SEED_CLAIMS

CONFIGS = ["no_tricks", "batchnorm", "layernorm", "all_tricks"]


def run_rows(experiment: str) -> pd.DataFrame:
    """One row per finished run: epoch-1 and final train loss, test accuracy, pre-clip grad-norm mean and CV."""
    client = MlflowClient()
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment '{experiment}' in {mlflow.get_tracking_uri()}")
    rows = []
    for run in client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'"):
        rid = run.info.run_id
        epoch_loss = sorted((m.step, m.value) for m in client.get_metric_history(rid, "epoch/train_loss"))
        norms = pd.Series([m.value for m in client.get_metric_history(rid, "opt/grad_norm_preclip")])
        rows.append({
            "config": run.data.tags.get("config"), "seed": int(run.data.tags.get("seed", -1)),
            "epochs": len(epoch_loss), "diverged": run.data.tags.get("diverged") == "true",
            "epoch1_loss": epoch_loss[0][1] if epoch_loss else float("nan"),
            "final_loss": epoch_loss[-1][1] if epoch_loss else float("nan"),
            "test_acc": run.data.metrics.get("test/acc", float("nan")),
            "grad_norm_mean": norms.mean(), "grad_norm_cv": norms.std() / norms.mean(),
        })
    return pd.DataFrame(rows)


def fmt(values: pd.Series, digits: int = 3) -> str:
    """mean ± sample std over seeds."""
    if len(values) < 2:
        return f"{values.mean():.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std():.{digits}f}"


def table(df: pd.DataFrame) -> str:
    """Markdown: measured mean ± std over seeds beside the seed's claims."""
    lines = ["| Config | seeds | Epoch-1 loss (seed claims) | Final loss (seed claims) | Test acc | "
             "Pre-clip grad norm mean (CV over steps) (seed claims) |", "|---|---|---|---|---|---|"]
    for config in CONFIGS:
        g = df[df.config == config]
        if g.empty:
            continue
        e1, fin, norm = SEED_CLAIMS[config].values()
        lines.append(f"| {config} | {len(g)} | {fmt(g.epoch1_loss)} ({e1}) | {fmt(g.final_loss)} ({fin}) | "
                     f"{fmt(g.test_acc, 4)} | {fmt(g.grad_norm_mean, 2)} (CV {g.grad_norm_cv.mean():.2f}) ({norm}) |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="seed-table")
    args = parser.parse_args()
    df = run_rows(args.experiment)
    print(table(df))
    print()
    print(df.sort_values(["config", "seed"]).to_string(index=False, float_format=lambda v: f"{v:.4f}"))


if __name__ == "__main__":
    main()
