"""bf16 autocast vs fp32: final train loss and test accuracy per config over seeds, and whether the gap is within seed noise.

    python -m analysis.precision_effect --experiment precision

Reads only MLflow (analysis.load): finished, non-diverged runs whose resolved config says fp32 or bf16.
A gap counts as "within seed noise" by the report's rule (analysis.stats.within_noise: < 2 Welch SE).
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd
from scipy import stats as scipy_stats

from analysis import load
from analysis.load import AnalysisError
from analysis.stats import mean_difference, noise_verdict

METRICS = ("final_loss", "test_acc")


def precision_runs(experiment: str) -> pd.DataFrame:
    """config, seed, precision and the two final metrics of every finished, non-diverged run."""
    runs = load.training_runs(experiment)
    runs = runs[~runs.diverged & runs.precision.isin(["fp32", "bf16"])]
    if runs.empty:
        raise AnalysisError(f"no finished, non-diverged fp32 or bf16 runs in '{experiment}'")
    return runs[["config", "seed", "precision", *METRICS]].dropna()


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """Per config and metric: fp32 and bf16 mean ± std, the difference, 2 x its standard error, Welch p, verdict."""
    rows = []
    for config, g in runs.groupby("config"):
        for metric in METRICS:
            fp32, bf16 = g[g.precision == "fp32"][metric], g[g.precision == "bf16"][metric]
            if len(fp32) < 2 or len(bf16) < 2:
                continue
            diff, se = mean_difference(fp32, bf16)
            rows.append({"config": config, "metric": metric, "seeds": f"{len(fp32)}/{len(bf16)}",
                         "fp32": f"{fp32.mean():.4f} ± {fp32.std():.4f}", "bf16": f"{bf16.mean():.4f} ± {bf16.std():.4f}",
                         "bf16 - fp32": diff, "2 SE": 2 * se, "welch_p": scipy_stats.ttest_ind(bf16, fp32, equal_var=False).pvalue,
                         "verdict": noise_verdict(fp32, bf16)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.precision_effect", description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="precision")
    args = parser.parse_args(argv)
    try:
        table = compare(precision_runs(args.experiment))
        if table.empty:
            raise AnalysisError(f"no config in '{args.experiment}' has >= 2 seeds in both precisions")
    except AnalysisError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(table.to_markdown(index=False, floatfmt=".4f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
