"""Divergence-boundary study: per config, an Optuna study over log10(LR) from the config's LR to factor x that LR.

    python -m experiments.stress run --configs no_tricks,all_tricks --seeds 0,1 --n-trials 16 --epochs 1

Each trial trains one (LR, seed) as a nested MLflow run. A trial that diverges is pruned at once
(training stops at the divergence step; --pruner threshold also stops one whose epoch loss is above
chance), so the budget goes to LRs near the boundary: TPE maximises log10(LR) among runs that converge.
Converged = final train loss < converge_ratio x loss at step 0. The LR x100 point and the config's
own LR are probed for every seed (when inside the range).
--range-from-lr-find centres the range on an LR range test's blow-up instead.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys

import mlflow
import optuna
from mlflow import MlflowClient
from optuna.trial import TrialState

from cookbook.config import CONFIGS_DIR, DEFAULT_EXPERIMENT, Config, ConfigError, file_config, load_config
from cookbook.data import DataError
from cookbook.hooks import Recorder
from cookbook.monitor import STEP_LOSS
from cookbook.stop import exit_code, exit_now
from cookbook.tracking import MlflowTracker, check_tracking, ready_store
from cookbook.train import EPOCH_LOSS, TrainResult, train
from experiments.adopt import adopt, initial_loss, orphaned_run
from experiments.boundary import CONVERGE_RATIO, converged
from experiments.grid import TRAIN_FLAGS, check_cells, config_names, overrides, parse_list, train_settings
from experiments.pruning import (
    NO_PRUNER,
    PRUNER_ATTR,
    PRUNERS,
    RANKING,
    STRESS_PRUNER,
    ReportToOptuna,
    check_pruner,
    prunable,
)
from experiments.storage import (
    DEFAULT_STORAGE,
    PARENT_RUN_ATTR,
    RUN_ID_ATTR,
    STRESS_TAG,
    TRIAL_TAG,
    SweepError,
    open_storage,
    recover_dead_workers,
    stamp_owner,
)
from experiments.stress_range import (
    LR_FIND_BLOWUP_ATTR,
    LR_FIND_RUN_ATTR,
    RANGE_ATTR,
    RANGE_FACTOR,
    range_from_blowup,
    run_range_test,
    search_range,
)
from experiments.stress_report import DONE, STRESS_REPORT, STRESS_RUN, done_trials, format_report, report, unrecorded
from experiments.stress_study import open_stress_study, stress_name
from experiments.workers import cached_mnist, join_workers, nested_under, parent_and_experiment, parent_run, serve, spawn, start_worker


def set_attrs(trial: optuna.Trial, attrs: dict) -> None:
    """Several trial user attrs at once."""
    for name, value in attrs.items():
        trial.set_user_attr(name, value)


def objective(trial: optuna.Trial, experiment: str, parent: str | None) -> float:
    """Train one (LR, seed); prune it if it diverges or the pruner stops it; value = log10 LR if it converged, else below
    the range."""
    stamp_owner(trial)
    spec = trial.study.user_attrs
    lo, hi = search_range(spec)
    log_lr = trial.suggest_float("log10_lr", lo, hi)
    seed = trial.suggest_categorical("seed", spec["seeds"])
    cfg = load_config(spec["config"], CONFIGS_DIR, overrides({"seed": seed, "lr": 10**log_lr}, spec["settings"]))
    # what a trial the pruner stops keeps (training below overwrites it): it did not converge
    set_attrs(trial, {"lr": 10**log_lr, "seed": seed, "diverged": False, "converged": False})
    if (stored := orphaned_run(trial, lambda failed: failed.params == trial.params)) is not None:  # its worker died before tell()
        adopt(trial, stored)
        result, initial = stored.result, initial_loss(MlflowClient(), stored.run_id)
    else:
        result, initial = trained(trial, cfg, experiment, parent)
    outcome = trial_outcome(result, initial, spec["converge_ratio"])
    set_attrs(trial, outcome)
    if result.diverged:
        raise optuna.TrialPruned(f"diverged at step {result.diverged_step}")
    return log_lr if outcome["converged"] else lo - 1.0


def trained(trial: optuna.Trial, cfg: Config, experiment: str, parent: str | None) -> tuple[TrainResult, float]:
    """Train the trial's point as a nested MLflow run; its result and its first step's loss."""
    spec, recorder = trial.study.user_attrs, Recorder()
    data = cached_mnist(cfg.data.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    tags = {STRESS_TAG: trial.study.study_name, TRIAL_TAG: str(trial.number)}
    name = f"{spec['config']} lr={cfg.optim.lr:.3g} seed={cfg.seed}"
    with prunable(MlflowTracker(cfg, data.md5, experiment=experiment, run_name=name, log_model=False, extra_tags=tags,
                                parent_run_id=parent, base=file_config(spec["config"], CONFIGS_DIR))) as tracker:
        trial.set_user_attr(RUN_ID_ATTR, tracker.run_id)
        result = train(cfg, data, [tracker, recorder, ReportToOptuna(trial)])
    return result, recorder.history[STEP_LOSS][0][1] if recorder.history.get(STEP_LOSS) else float("nan")


def trial_outcome(result, initial_loss: float, converge_ratio: float) -> dict:
    """What a trial keeps of its training; a diverged one has no final loss (its last epoch's is from before it blew up)."""
    final = result.final.get(EPOCH_LOSS, float("nan"))
    kept = math.isfinite(final) and not result.diverged
    return {"diverged": result.diverged, "steps_run": result.steps_run, "initial_loss": initial_loss,
            "final_loss": final if kept else None, "converged": kept and converged(final, initial_loss, converge_ratio)}


def budget(n_trials: int) -> optuna.study.MaxTrialsCallback:
    """Stops a worker once the finished trials and those other workers are running reach n_trials: counting finished
    ones only, each worker would start one more while another's last trial runs (6 trials of 5 with two workers)."""
    return optuna.study.MaxTrialsCallback(n_trials, states=(*DONE, TrialState.RUNNING))


def work(storage: str, name: str, n_trials: int, experiment: str, threads: int | None = None) -> None:
    """Run trials until the study holds n_trials finished ones (shared budget across workers)."""
    study = open_stress_study(storage, config="", name=name)  # a study that is not there: nothing made, not even a store
    start_worker(threads)
    recover_dead_workers(study)
    parent, experiment = parent_and_experiment(study, experiment)
    if len(study.get_trials(deepcopy=False, states=DONE)) < n_trials:
        serve(study, lambda: study.optimize(lambda t: objective(t, experiment, parent), n_trials=n_trials,
                                            callbacks=[budget(n_trials)]))


def check_args(args: argparse.Namespace) -> tuple[list[str], dict, list[int]]:
    """Configs, training settings and seeds, every flag checked (one-line SweepError) before anything is made."""
    configs, settings = config_names(args.configs), train_settings(args)
    if args.workers < 1:
        raise SweepError(f"workers={args.workers} must be >= 1")
    seeds = parse_list(args.seeds, int, "seeds")
    if len(set(seeds)) < len(seeds):  # each seed's base and x100 probes are queued once: a repeat would change only the name
        raise SweepError(f"seeds={args.seeds!r} lists a seed more than once; give each seed once")
    if args.n_trials < 2 * len(seeds) or not 100 < args.factor < math.inf or not 0 < args.converge_ratio < 1:
        raise SweepError(f"need n_trials >= 2 x seeds ({2 * len(seeds)}), a finite factor > 100, 0 < converge_ratio < 1; got "
                         f"n_trials={args.n_trials}, factor={args.factor}, converge_ratio={args.converge_ratio}")
    args.pruner = check_pruner(args.pruner, STRESS_PRUNER, ranking=False)
    check_cells([{"config": name, "lr": 1.0, "seed": seed} for name in configs for seed in seeds], settings)
    return configs, settings, seeds


def start_study(args: argparse.Namespace, config: str, seeds: list[int], settings: dict, parent) -> optuna.Study:
    """The config's study, created or resumed (its range from an LR range test if asked), named on the parent run."""
    spec = {"config": config, "seeds": sorted(seeds), "settings": settings, "factor": args.factor,
            "converge_ratio": args.converge_ratio}  # seeds sorted: the same seeds in another order are the same study
    if args.pruner != NO_PRUNER:  # no pruner keeps the names earlier studies had
        spec[PRUNER_ATTR] = args.pruner
    found, stored = {}, optuna.get_all_study_names(open_storage(args.storage))
    for order in [seeds, sorted(seeds)] if seeds != sorted(seeds) else [seeds]:  # names did not sort seeds before: an
        spec["seeds"] = order  # earlier study named by the order given (its range test on its first seed) resumes
        if args.range_from_lr_find:
            found = range_from_test(spec, parent)
        if stress_name(spec) in stored:
            break
    study = open_stress_study(args.storage, config, spec)
    if lost := unrecorded(study):  # its report would stand on runs this store does not hold
        raise SweepError(f"stress study '{study.study_name}' has {len(lost)} finished trials whose runs are not FINISHED in "
                         f"{mlflow.get_tracking_uri()}; run it against the store it was made with (or restore the runs), "
                         "or start it afresh with another --storage")
    for key, value in {PARENT_RUN_ATTR: parent.run_id, **found}.items():
        study.set_user_attr(key, value)
    lo, hi = search_range(spec)
    mlflow.set_tags({f"stress.{config}.study": study.study_name, f"stress.{config}.lr_range": f"{10**lo:.3g},{10**hi:.3g}",
                     f"stress.{config}.{PRUNER_ATTR}": args.pruner})
    return study


def range_from_test(spec: dict, parent) -> dict:
    """Run the LR range test on the spec's first seed and put its range in the spec (none where it never blew up: it says
    nothing of where training fails, the default range stands); the attrs that name the test."""
    test, run_id = run_range_test(spec["config"], spec["settings"], spec["seeds"][0],
                                  mlflow.get_experiment(parent.experiment_id).name, parent.run_id)
    spec.pop(RANGE_ATTR, None)
    if test.blowup_lr:
        spec[RANGE_ATTR] = list(range_from_blowup(test.blowup_lr))
    return {LR_FIND_RUN_ATTR: run_id, LR_FIND_BLOWUP_ATTR: test.blowup_lr}  # not in the spec: a rerun resumes


def run_stress(args: argparse.Namespace) -> int:
    """Validate everything, then one study per config, each run by `workers` processes; print the boundaries."""
    from experiments.study_figures import log_stress_history  # here: the workers run this module and never draw

    configs, settings, seeds = check_args(args)
    check_tracking()  # first: a bad store makes no journal; then a bad storage makes no store
    open_storage(args.storage)
    ready_store()
    reports, short = [], []
    nest = None  # inside `mlflow run -e stress` its project run is the parent
    if not os.environ.get("MLFLOW_RUN_ID"):
        nest = nested_under(mlflow.set_experiment(args.experiment).experiment_id)
    with parent_run(mlflow.start_run(run_name=STRESS_RUN, parent_run_id=nest)) as parent:
        for name in configs:
            study = start_study(args, name, seeds, settings, parent.info)
            complete = run_workers(args, study)
            short += [] if complete else [name]
            reports.append({**report(study), "trials_asked": args.n_trials, "complete": complete})
            log_stress_history(study, done_trials(study), reports[-1])
            print(format_report(reports[-1]), file=sys.stderr, flush=True)
        mlflow.log_text(json.dumps(reports, indent=1, default=str), STRESS_REPORT)
        if short:  # a report from fewer trials than asked is no result: the analysis reads FINISHED stress runs only
            mlflow.end_run("FAILED")
    print("\n".join(format_report(r) for r in reports))
    if short:  # the report above is from fewer trials than asked: say so, and let a rerun finish them
        print(f"error: {', '.join(short)}: workers failed before {args.n_trials} trials finished; "
              "the same command resumes", file=sys.stderr)
    return 1 if short else 0


def run_workers(args: argparse.Namespace, study: optuna.Study) -> bool:
    """Worker processes sharing the study's trial budget (threads split between them), in rounds until it is spent: a
    killed worker's trial fails (its run KILLED) and is queued again. True when the study holds n_trials finished ones."""
    for _ in range(3):
        procs = spawn("experiments.stress", ["--study", study.study_name, "--storage", args.storage, "--n-trials",
                                             str(args.n_trials), "--experiment", args.experiment], args.workers, args.device)
        join_workers(procs, lambda ps: [p.wait() for p in ps])
        recover_dead_workers(study)
        if len(study.get_trials(deepcopy=False, states=DONE)) >= args.n_trials:
            return True
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.stress", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--configs", default="all_tricks")
    run.add_argument("--seeds", default="0,1")
    run.add_argument("--n-trials", type=int, default=16, help="budget per config, base and x100 probes included")
    run.add_argument("--factor", type=float, default=1000.0, help="probe LRs up to factor x the config's LR")
    run.add_argument("--converge-ratio", type=float, default=CONVERGE_RATIO, help="converged: final loss < ratio x loss at step 0")
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--pruner", default=STRESS_PRUNER,
                     help=f"{', '.join(p for p in PRUNERS if p not in RANKING)}: may stop a trial that is not converging")
    run.add_argument("--range-from-lr-find", action="store_true",
                     help=f"search blow-up / {RANGE_FACTOR:g} to blow-up x {RANGE_FACTOR:g} of an LR range test run first "
                          "(--factor's range only where the test never blows up)")
    for flag in TRAIN_FLAGS:
        run.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None)
    work_parser = sub.add_parser("work")
    work_parser.add_argument("--study", required=True)
    work_parser.add_argument("--n-trials", type=int, required=True)
    work_parser.add_argument("--threads", type=int, default=None)
    for p in (run, work_parser):
        p.add_argument("--storage", default=DEFAULT_STORAGE)
        p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "Using an existing study": our own lines say what it opened
    if args.command == "work":
        command = lambda: work(args.storage, args.study, args.n_trials, args.experiment, args.threads) or 0  # noqa: E731
    else:
        command = lambda: run_stress(args)  # noqa: E731
    return exit_code(command, (SweepError, ConfigError, DataError),
                     "running trials ended KILLED and went back to the queue: the same command resumes")


if __name__ == "__main__":
    exit_now(main())
