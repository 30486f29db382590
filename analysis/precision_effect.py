"""bf16 autocast vs fp32: final train loss and test accuracy per config, paired by seed, and whether the gap is within
seed noise.

    python -m analysis.precision_effect --experiment precision

Reads only MLflow (analysis.load): the latest finished run of each config, setting, seed and precision. A run is paired
with the run of the other precision that has the same config, setting and seed (same initialisation and data order), so
the gap is judged against the spread of the per-seed differences (analysis.stats.within_noise, paired: inside the 95%
t-interval, the same verdict as the paired t-test at p = 0.05). A diverged run has no final metrics: it leaves its pair
out and is counted in its own column, never hidden.
"""
from __future__ import annotations

import argparse
import sys

import pandas as pd
from scipy import stats as scipy_stats

from analysis import load
from analysis.load import AnalysisError
from analysis.sections import MISSING, markdown_table
from analysis.select import latest
from analysis.stats import noise_verdict, paired_difference

METRICS = ("final_loss", "test_acc")
PRECISIONS = ("fp32", "bf16")
# Everything that must match for two runs to differ only in precision; the seed is matched on its own.
SETTING = ["config", "lr", "width", "depth", "warmup_epochs", "max_norm", "norm", "init", "optimizer", "weight_decay",
           "momentum", "schedule", "lr_min", "epochs", "batch_size", "train_subset", "test_subset"]


def precision_runs(experiment: str) -> pd.DataFrame:
    """The latest finished fp32 or bf16 run of each setting, seed and precision in the experiment."""
    runs = load.training_runs(experiment)
    runs = runs[runs.precision.isin(PRECISIONS)]
    if runs.empty:
        raise AnalysisError(f"no finished fp32 or bf16 runs in '{experiment}'")
    return latest(runs, [*SETTING, "seed", "precision"])




def spread(v: pd.Series) -> str:
    """'mean ± std' over the pairs, n/a for what fewer than 2 (a std) or no pairs (both) cannot give."""
    if v.empty:
        return MISSING
    return f"{v.mean():.4f} ± " + (MISSING if len(v) < 2 else f"{v.std():.4f}")


def no_pair(g: pd.DataFrame, kept: int, metric: str) -> str:
    """Why a setting has no pair to compare: the runs that diverged, each side, and the pairs without the metric."""
    why = [f"{p} diverged {int(g[f'diverged_{p}'].sum())}/{len(g)}" for p in PRECISIONS if g[f"diverged_{p}"].any()]
    return "no comparable pair: " + ", ".join(why + ([f"{kept}/{len(g)} pairs lack {metric}"] if kept else []))


def compare(runs: pd.DataFrame) -> pd.DataFrame:
    """Per config, setting and metric: pairs, diverged runs a side, fp32 and bf16 mean ± std over the pairs, the mean
    paired difference, its 95% half-width, the paired t-test's p and the verdict. Where a config has several settings,
    its label names the keys that vary."""
    fp32, bf16 = (runs[runs.precision == p] for p in PRECISIONS)
    both = fp32.merge(bf16, on=[*SETTING, "seed"], suffixes=("_fp32", "_bf16"))  # NaN keys (no subset) match NaN
    rows = []
    for key, g in both.groupby(SETTING, dropna=False, sort=False):
        mine = both[both.config == key[0]]  # name the setting keys that vary within the config, if any
        varying = [k for k in SETTING[1:] if mine[k].nunique(dropna=False) > 1]
        config = key[0] if not varying else f"{key[0]} ({', '.join(f'{k}={g[k].iloc[0]}' for k in varying)})"
        diverged = f"{int(g.diverged_fp32.sum())}/{int(g.diverged_bf16.sum())}"
        ok = g[~g.diverged_fp32 & ~g.diverged_bf16]
        for metric in METRICS:
            both_ok = ok[[f"{metric}_fp32", f"{metric}_bf16"]].dropna()  # a pair lacking the value says nothing of it
            a, b = both_ok[f"{metric}_fp32"], both_ok[f"{metric}_bf16"]
            diff, half_width = paired_difference(a, b)
            p = scipy_stats.ttest_rel(b, a).pvalue if len(a) >= 2 and (b - a).std() > 0 else float("nan")
            rows.append({"config": config, "metric": metric, "pairs": len(a), "diverged fp32/bf16": diverged,
                         "fp32": spread(a), "bf16": spread(b),
                         "bf16 - fp32": diff, "95% half-width": half_width, "paired_p": p,
                         "verdict": noise_verdict(a, b, paired=True) if len(a) else no_pair(g, len(ok), metric)})
    return pd.DataFrame(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.precision_effect", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", default="precision")
    args = parser.parse_args(argv)
    try:
        load.check_store()
        table = compare(precision_runs(args.experiment))
        if table.empty:
            raise AnalysisError(f"no config in '{args.experiment}' has a seed trained in both fp32 and bf16 at one setting")
    except load.READ_ERRORS as e:
        print(load.refusal(e), file=sys.stderr)
        return 2
    print(markdown_table(table, floatfmt=".4f"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
