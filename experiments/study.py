"""The whole study the report needs, at a chosen scale, then the analysis: `python -m experiments.study --scale full`.

Phases (each an ordinary, resumable sweep or stress study, all into one MLflow experiment): seed table
(every config at its own settings over seeds), LR x100 probe, the rest of the LR grid, warmup vs model
size, LR stress; then `python -m analysis`. Rerunning the same command skips every finished cell, so a
long study survives being stopped; `--phases` runs a subset (e.g. the seed table first, the rest later).
"""
from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import mlflow
from mlflow.exceptions import MlflowException

from analysis.cli import check_output
from analysis.load import AnalysisError
from analysis.report import report_files
from cookbook.config import Config, merge, validate
from cookbook.resources import check
from cookbook.stop import Terminated, exit_code, exit_now
from experiments.storage import DEFAULT_STORAGE
from experiments.workers import PARENT_RUN_ENV, run_experiment, worker_env

CONFIGS = "no_tricks,batchnorm,layernorm,all_tricks"
SIZE_CONFIG = "no_tricks"  # warmup vs size on the config without normalization or clipping: warmup acts alone
X100_LR = "1e-1"  # 100 x every config's own LR (1e-3): the seed's stress test


@dataclass(frozen=True)
class Scale:
    """Training length and grids of one scale; every phase trains with `train` unless it says otherwise."""

    train: tuple[str, ...]  # training flags shared by every sweep cell
    seeds: str  # seed table
    grid_seeds: str  # LR grid and the x100 probe
    grid_lrs: str  # the LR grid beyond each config's own LR (1e-3, from the seed table) and x100 (its own phase)
    widths: str  # warmup vs size: model widths (channel multipliers)
    size_lrs: str
    size_seeds: str
    stress_trials: int  # per config, the base and x100 probes of every stress seed included
    stress_seeds: str
    converge_ratio: float  # converged = not diverged and final loss < ratio x loss at step 0
    stress_train: tuple[str, ...] | None = None  # None = the same training as every other phase


SCALES = {
    "smoke": Scale(("--epochs", "1", "--train-subset", "512", "--test-subset", "200", "--batch-size", "64"), "0,1", "0,1",
                   "1e-2", "0.5,1", "1e-3,1e-2", "0", 2, "0", 0.7,
                   ("--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64")),
    # the full scale's grids (5 widths spanning 24x in parameters), each run 200 updates: about 80 min on 2 cores (README)
    "quick": Scale(("--epochs", "2", "--train-subset", "12800", "--test-subset", "2000"), "0,1,2,3,4", "0,1,2",
                   "1e-4,3e-4,3e-3,1e-2,3e-2", "0.25,0.5,0.75,1,1.25", "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", "0,1", 16, "0,1,2", 0.5),
    "default": Scale(("--epochs", "5", "--train-subset", "30000", "--test-subset", "5000"), "0,1,2", "0,1", "1e-4,1e-2",
                     "0.25,0.5,1,2", "1e-3,3e-3,1e-2,3e-2,1e-1", "0", 10, "0", 0.5,
                     ("--epochs", "2", "--train-subset", "10000", "--test-subset", "2000")),
    # the issue-9 scale: every run 5 epochs on all 60k images, tested on all 10k
    "full": Scale(("--epochs", "5"), "0,1,2,3,4", "0,1,2", "1e-4,3e-4,3e-3,1e-2,3e-2", "0.25,0.5,1,2,4",
                  "3e-4,1e-3,3e-3,1e-2,3e-2,1e-1", "0,1", 16, "0,1,2", 0.5),
}
STUDY_EXPERIMENT = "study"
PHASES = ("seeds", "x100", "grid", "size", "stress")  # in the order they run
PHASE_TITLES = {"seeds": "seed table", "x100": "LR x100 probe", "grid": "LR grid", "size": "warmup vs size",
                "stress": "LR stress"}


def phase_commands(scale: Scale, experiment: str, run_flags: list[str], stack: int) -> dict[str, list[str]]:
    """argv of every phase at the scale; run_flags (workers, storage, device, precision) go to every phase."""
    common = ["--experiment", experiment, *run_flags]
    sweep = [sys.executable, "-m", "experiments.sweep", "run", *common, "--stack", str(stack), *scale.train]
    return {
        "seeds": [*sweep, "--configs", CONFIGS, "--seeds", scale.seeds],
        "x100": [*sweep, "--configs", CONFIGS, "--seeds", scale.grid_seeds, "--lrs", X100_LR],
        "grid": [*sweep, "--configs", CONFIGS, "--seeds", scale.grid_seeds, "--lrs", scale.grid_lrs],
        "size": [*sweep, "--configs", SIZE_CONFIG, "--seeds", scale.size_seeds, "--lrs", scale.size_lrs,
                 "--widths", scale.widths, "--warmup-epochs", "0,1"],
        "stress": [sys.executable, "-m", "experiments.stress", "run", *common, "--configs", CONFIGS,
                   "--seeds", scale.stress_seeds, "--n-trials", str(scale.stress_trials),
                   "--converge-ratio", str(scale.converge_ratio), *(scale.stress_train or scale.train)],
    }


def parse_phases(text: str) -> list[str]:
    """'seeds,x100' -> ['seeds', 'x100'] in run order; unknown names are one-line errors."""
    names = [p.strip() for p in text.split(",") if p.strip()]
    bad = [p for p in names if p not in PHASES]
    if bad or not names:
        raise ValueError(f"phases={text!r}; choose from {', '.join(PHASES)}")
    return [p for p in PHASES if p in names]


def default_stack(device: str, seeds: str) -> int:
    """On CUDA the seeds of a cell train as one stacked model (GPU throughput); on CPU one run at a time."""
    import torch

    cuda = device.startswith("cuda") or (device in ("", "auto") and torch.cuda.is_available())
    return len(seeds.split(",")) if cuda else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.study", description=__doc__.split("\n\n")[0])
    parser.add_argument("--scale", default="default", help=f"one of {', '.join(SCALES)}")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma list from {', '.join(PHASES)}")
    parser.add_argument("--experiment", default=STUDY_EXPERIMENT,
                        help="MLflow experiment of every phase's runs (empty: inside `mlflow run`, the project run's)")
    parser.add_argument("--output", default="", help="report folder (default reports/<experiment>)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--storage", default=DEFAULT_STORAGE)
    parser.add_argument("--device", default="", help="cpu, cuda, cuda:N (default: each config's, i.e. cuda if available)")
    parser.add_argument("--precision", default="", help="fp32 or bf16 (default: each config's, fp32)")
    parser.add_argument("--stack", type=int, default=0, help="seeds per stacked model (default: all seeds on CUDA, 1 on CPU)")
    parser.add_argument("--no-analysis", action="store_true", help="run the phases only")
    return parser


def run_child(command: list[str], env: dict[str, str]) -> int:
    """A phase's (or the analysis') exit code. Stopped meanwhile, the study stops it first and waits: its runs end KILLED
    and its cells go back to the queue, instead of a sweep running on as an orphan (SIGTERM reached only the study)."""
    child = subprocess.Popen(command, env=env)
    try:
        return child.wait()
    except KeyboardInterrupt as stop:
        child.send_signal(signal.SIGTERM if isinstance(stop, Terminated) else signal.SIGINT)
        child.wait()  # a later signal does not raise again (cookbook.stop): the phase gets to end its runs
        raise


def project_experiment() -> str | None:
    """Inside `mlflow run . -e study`: the experiment of the project run (`--experiment-name`'s); else None."""
    run_id = os.environ.get("MLFLOW_RUN_ID")
    try:
        return run_experiment(run_id) if run_id else None
    except MlflowException:  # a value left in the shell: the study would end with a traceback, its phases done
        raise ValueError(f"MLFLOW_RUN_ID={run_id} names no run in {mlflow.get_tracking_uri()}; unset it (`mlflow run` "
                         "sets it)") from None


def phase_env(experiment: str) -> dict[str, str]:
    """The phases' environment: they make their own parent runs (not inside this process's run), nested under the
    `mlflow run` project run where they train in its experiment (a run is shown nested only in its parent's)."""
    env = worker_env()
    env.pop(PARENT_RUN_ENV, None)  # one left in the environment is not this study's
    if os.environ.get("MLFLOW_RUN_ID") and project_experiment() == experiment:
        env[PARENT_RUN_ENV] = os.environ["MLFLOW_RUN_ID"]
    return env


def run_phases(commands: dict[str, list[str]], phases: list[str], env: dict[str, str]) -> tuple[dict[str, float], int]:
    """Run the phases in order: their wall times in seconds, and 0 or the exit code of the phase that failed."""
    timings = {}
    for i, phase in enumerate(phases):
        print(f"[study] phase {i + 1}/{len(phases)}, {PHASE_TITLES[phase]}: {' '.join(commands[phase][1:])}",
              file=sys.stderr, flush=True)
        started = time.time()
        code = run_child(commands[phase], env)
        if code == 2:  # bad input, refused in one line before any run: nothing to resume
            return timings, 2
        if code != 0:
            print(f"error: phase '{phase}' failed; rerun the same command to resume", file=sys.stderr)
            return timings, 1
        timings[PHASE_TITLES[phase]] = time.time() - started
    return timings, 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        project = project_experiment()  # a stale MLFLOW_RUN_ID: one line here, not a traceback once the phases are done
        args.experiment = args.experiment or project or STUDY_EXPERIMENT  # empty: `mlflow run`'s, else "study"
        if args.scale not in SCALES:
            raise ValueError(f"scale={args.scale!r}; choose one of {', '.join(SCALES)}")
        phases = parse_phases(args.phases)
        if args.workers < 1 or args.stack < 0:
            raise ValueError(f"workers={args.workers} must be >= 1 and stack={args.stack} >= 0")
        check(validate(merge(Config(), {"device": args.device or "auto", "compute": {"precision": args.precision or "fp32"}})))
        check_output(Path(args.output or f"reports/{args.experiment}"))
    except (ValueError, AnalysisError) as e:  # ConfigError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 2
    return exit_code(lambda: run_study(args, phases), (), "the phase running was stopped too; the same command resumes")


def run_study(args: argparse.Namespace, phases: list[str]) -> int:
    """The phases, then the analysis; timings printed (and logged inside `mlflow run . -e study`)."""
    scale = SCALES[args.scale]
    run_flags = ["--workers", str(args.workers), "--storage", args.storage]
    run_flags += [x for flag in ("device", "precision") if getattr(args, flag) for x in (f"--{flag}", getattr(args, flag))]
    commands = phase_commands(scale, args.experiment, run_flags, args.stack or default_stack(args.device, scale.seeds))
    started = time.time()
    timings, failed = run_phases(commands, phases, phase_env(args.experiment))
    if failed:
        return failed
    output = Path(args.output or f"reports/{args.experiment}")
    code = 0
    if not args.no_analysis:
        t = time.time()
        code = run_child([sys.executable, "-m", "analysis", "--experiment", args.experiment, "--output", str(output)], worker_env())
        timings["analysis"] = time.time() - t
    wall = time.time() - started
    if os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run . -e study`: the project run keeps the report and timings
        with mlflow.start_run():
            mlflow.log_metrics({f"study/{k.replace(' ', '_')}_seconds": v for k, v in timings.items()} | {"study/wall_seconds": wall})
            for path in report_files(output) if not args.no_analysis else []:  # this report's, not the folder's
                mlflow.log_artifact(str(path), "report")
    print("\n".join(f"[study] {k}: {v / 60:.1f} min" for k, v in timings.items()) + f"\n[study] total {wall / 60:.1f} min")
    if not args.no_analysis and code == 0:
        print(f"report: {output / 'report.html'}")
    return code


if __name__ == "__main__":
    exit_now(main())
