"""bf16 autocast vs fp32: final train loss and test accuracy per config over seeds, and whether the gap is within seed noise.

    python -m analysis.precision_effect --experiment precision

Reads only MLflow: finished runs whose resolved config (param config.compute.precision) says fp32 or bf16.
A gap counts as "within seed noise" when |mean difference| < 2 x its standard error (Welch).
"""
from __future__ import annotations

import argparse
import math
import sys

import mlflow
import pandas as pd
from scipy import stats

METRICS = {"final_loss": "metrics.epoch/train_loss", "test_acc": "metrics.test/acc"}


def load_runs(experiment: str) -> pd.DataFrame:
    """config, seed, precision and the two final metrics of every finished, non-diverged run."""
    exp = mlflow.get_experiment_by_name(experiment)
    if exp is None:
        raise SystemExit(f"error: no experiment '{experiment}' in {mlflow.get_tracking_uri()}")
    runs = mlflow.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'")
    if runs.empty or "params.config.compute.precision" not in runs:
        raise SystemExit(f"error: no finished runs with a compute.precision param in '{experiment}'")
    runs = runs[runs["tags.diverged"] == "false"]
    return pd.DataFrame({"config": runs["tags.config"], "seed": runs["tags.seed"].astype(int),
                         "precision": runs["params.config.compute.precision"],
                         **{name: runs[col] for name, col in METRICS.items()}}).dropna()


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """Per config and metric: fp32 and bf16 mean ± std, the difference, 2 x its standard error, Welch p, verdict."""
    rows = []
    for (config, metric), _ in runs.melt(["config", "seed", "precision"], list(METRICS), "metric").groupby(["config", "metric"]):
        fp32 = runs[(runs.config == config) & (runs.precision == "fp32")][metric]
        bf16 = runs[(runs.config == config) & (runs.precision == "bf16")][metric]
        if len(fp32) < 2 or len(bf16) < 2:
            continue
        diff = bf16.mean() - fp32.mean()
        se = math.sqrt(fp32.var() / len(fp32) + bf16.var() / len(bf16))
        rows.append({"config": config, "metric": metric, "seeds": f"{len(fp32)}/{len(bf16)}",
                     "fp32": f"{fp32.mean():.4f} ± {fp32.std():.4f}", "bf16": f"{bf16.mean():.4f} ± {bf16.std():.4f}",
                     "bf16 - fp32": diff, "2 SE": 2 * se, "welch_p": stats.ttest_ind(bf16, fp32, equal_var=False).pvalue,
                     "verdict": "within seed noise" if abs(diff) < 2 * se else "outside seed noise"})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.precision_effect", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="precision")
    args = parser.parse_args(argv)
    table = compare(load_runs(args.experiment))
    if table.empty:
        print("error: no config has >= 2 seeds in both precisions", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=".4f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
