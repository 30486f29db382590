"""The whole study the report needs, at a chosen scale, then the analysis: `python -m experiments.study --scale quick`.

Phases (each an ordinary, resumable sweep or stress study, all into one MLflow experiment):
seed table (every config at its own settings over seeds), LR grid, LR stress, warmup vs model size,
then `python -m analysis`. Rerunning the same command skips every finished cell.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow

from experiments.sweep import worker_env

CONFIGS = "no_tricks,batchnorm,layernorm,all_tricks"
# scale -> training settings shared by every phase, the grids, and the stress budget
SCALES = {
    "smoke": {"train": ["--epochs", "1", "--train-subset", "512", "--test-subset", "200", "--batch-size", "64"],
              "seeds": "0,1", "grid_seeds": "0,1", "lrs": "1e-2", "widths": "0.5,1", "size_lrs": "1e-3,1e-2",
              "stress_trials": "2", "stress_train": ["--epochs", "1", "--train-subset", "256", "--test-subset", "100"]},
    "quick": {"train": ["--epochs", "2", "--train-subset", "12800", "--test-subset", "2000"], "seeds": "0,1", "grid_seeds": "0,1",
              "lrs": "1e-4,1e-2,1e-1", "widths": "0.5,1,2", "size_lrs": "1e-3,1e-2,1e-1", "stress_trials": "6",
              "stress_train": ["--epochs", "1", "--train-subset", "6400", "--test-subset", "1000"]},
    "default": {"train": ["--epochs", "5", "--train-subset", "30000", "--test-subset", "5000"], "seeds": "0,1,2", "grid_seeds": "0,1",
                "lrs": "1e-4,1e-2,1e-1", "widths": "0.25,0.5,1,2", "size_lrs": "1e-3,3e-3,1e-2,3e-2,1e-1",
                "stress_trials": "10", "stress_train": ["--epochs", "2", "--train-subset", "10000", "--test-subset", "2000"]},
    "full": {"train": ["--epochs", "5"], "seeds": "0,1,2,3,4", "grid_seeds": "0,1,2", "lrs": "1e-4,3e-4,3e-3,1e-2,3e-2,1e-1",
             "widths": "0.25,0.5,1,2,4", "size_lrs": "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", "stress_trials": "16",
             "stress_train": ["--epochs", "5"]},
}
SIZE_CONFIG = "no_tricks"  # warmup vs size on the config without normalization or clipping: warmup acts alone


def phases(scale: str, experiment: str, workers: int, storage: str) -> list[tuple[str, list[str]]]:
    """(name, argv) of every phase at the scale."""
    s = SCALES[scale]
    common = ["--experiment", experiment, "--workers", str(workers), "--storage", storage]
    sweep = [sys.executable, "-m", "experiments.sweep", "run", *common, *s["train"]]
    return [
        ("seed table", [*sweep, "--configs", CONFIGS, "--seeds", s["seeds"]]),
        ("LR grid", [*sweep, "--configs", CONFIGS, "--seeds", s["grid_seeds"], "--lrs", s["lrs"]]),
        ("warmup vs size", [*sweep, "--configs", SIZE_CONFIG, "--seeds", "0", "--lrs", s["size_lrs"],
                            "--widths", s["widths"], "--warmup-epochs", "0,1"]),
        ("LR stress", [sys.executable, "-m", "experiments.stress", "run", *common, "--configs", CONFIGS,
                       "--seeds", "0", "--n-trials", s["stress_trials"], "--converge-ratio", "0.7", *s["stress_train"]]),
    ]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.splitlines()[0])
    parser.add_argument("--scale", default="default", help=f"one of {', '.join(SCALES)}")
    parser.add_argument("--experiment", default="study")
    parser.add_argument("--output", default="", help="report folder (default reports/<experiment>)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--storage", default="optuna/journal.log")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.scale not in SCALES:
        print(f"error: scale={args.scale!r}; choose one of {', '.join(SCALES)}", file=sys.stderr)
        return 2
    env = worker_env()  # the phases make their own runs in the experiment, not inside this one
    started, timings = time.time(), {}
    for name, cmd in phases(args.scale, args.experiment, args.workers, args.storage):
        print(f"[study] {name}: {' '.join(cmd[1:])}", file=sys.stderr, flush=True)
        t = time.time()
        if subprocess.run(cmd, env=env).returncode != 0:
            print(f"error: phase '{name}' failed; rerun the same command to resume", file=sys.stderr)
            return 1
        timings[name] = time.time() - t
    output = Path(args.output or f"reports/{args.experiment}")
    analysis = subprocess.run([sys.executable, "-m", "analysis", "--experiment", args.experiment, "--output", str(output)], env=env)
    wall = time.time() - started
    if os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run . -e study`: the project run keeps the report and timings
        with mlflow.start_run():
            mlflow.log_metrics({f"study/{k.replace(' ', '_')}_seconds": v for k, v in timings.items()} | {"study/wall_seconds": wall})
            mlflow.log_artifacts(str(output), "report")
    print("\n".join(f"[study] {k}: {v / 60:.1f} min" for k, v in timings.items()) + f"\n[study] total {wall / 60:.1f} min")
    print(f"report: {(output / 'report.html').resolve()}")
    return analysis.returncode


if __name__ == "__main__":
    sys.exit(main())
