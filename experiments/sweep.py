"""Sweeps on Optuna: each cell of a config x seed x LR (x width, depth, warmup) grid is one trial and one nested MLflow run.

    python -m experiments.sweep run --configs no_tricks,all_tricks --seeds 0,1 --lrs 1e-3,1e-2 --workers 2
    python -m experiments.sweep work --study NAME --storage URL      # join from another machine

Optuna's storage is the shared record and the work queue: cells are enqueued trials, workers
pop them with study.optimize, a killed worker's cell is failed and requeued (heartbeat on RDB
storages, pid check on the journal file), and a finished cell is never run again.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import time
import warnings
from typing import NamedTuple

import mlflow
import optuna
from mlflow.utils.mlflow_tags import MLFLOW_RUN_NAME
from optuna.trial import TrialState

from cookbook.checkpoint import checkpoint_path
from cookbook.config import CONFIGS_DIR, DEFAULT_EXPERIMENT, Config, ConfigError, file_config, load_config
from cookbook.data import MNIST, DataError
from cookbook.resume import ResumedTracker
from cookbook.stacked import train_stacked
from cookbook.stop import exit_code, exit_now
from cookbook.tracking import MlflowTracker, check_tracking, ready_store
from cookbook.train import train
from experiments.grid import TRAIN_FLAGS, cell_key, check_cells, group_key, make_cells, overrides, sweep_name, train_settings
from experiments.pruning import PRUNER_ATTR, PRUNERS, SWEEP_PRUNER, ReportToOptuna, check_pruner, prunable, stored_pruner
from experiments.queue import Claim, claim, enqueue_missing, open_study, state_counts, take_cell
from experiments.resume_cells import adopted, record_result, report_stored_epochs, stopped_run, tell_adopted
from experiments.storage import (
    CELL_TAG,
    DEFAULT_STORAGE,
    PARENT_RUN_ATTR,
    RUN_ID_ATTR,
    SWEEP_TAG,
    TRIAL_TAG,
    SweepError,
    check_records,
    heartbeat,
    recover_dead_workers,
)
from experiments.sweep_summary import print_summary, summary
from experiments.workers import cached_mnist, join_workers, nested_under, parent_and_experiment, parent_run, serve, spawn, start_worker

POLL_SECONDS = 2.0  # progress lines; a worker waiting on another's cell looks again after IDLE_SECONDS
IDLE_SECONDS = 0.5


class CellRun(NamedTuple):
    """What training one cell needs: its resolved config, its data, its MLflow run (a tracker not yet entered)."""

    cfg: Config
    data: MNIST
    tracker: MlflowTracker


def cell_run(trial: optuna.Trial, cell: dict, experiment: str, parent_run_id: str | None, resume: bool = False) -> CellRun:
    """The cell's resolved config, its data and its nested MLflow run: with resume, the cell's stopped run if it has a
    checkpoint here (a stacked group trains from step 0: its members have no checkpoints)."""
    study = trial.study
    cfg = load_config(cell["config"], CONFIGS_DIR, overrides(cell, study.user_attrs["settings"]))
    data = cached_mnist(cfg.data.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    key = cell_key(cell)
    tags = {SWEEP_TAG: study.study_name, TRIAL_TAG: str(trial.number), CELL_TAG: key}
    stopped = stopped_run(trial, key) if resume else None
    make = functools.partial(ResumedTracker, run_id=stopped) if stopped else MlflowTracker
    tracker = make(cfg, data.md5, experiment=experiment, run_name=key, log_model=False,
                   extra_tags=tags, parent_run_id=parent_run_id, base=file_config(cell["config"], CONFIGS_DIR))
    return CellRun(cfg, data, tracker)


def objective(trial: optuna.Trial, experiment: str, parent_run_id: str | None) -> float:
    """Train one queued cell, tracked as a nested MLflow run (continuing its stopped run from a checkpoint if it has one)."""
    cell = take_cell(trial)
    if (value := adopted(trial, cell)) is not None:
        return value
    cfg, data, tracker = cell_run(trial, cell, experiment, parent_run_id, resume=True)
    with prunable(tracker):
        trial.set_user_attr(RUN_ID_ATTR, tracker.run_id)
        report_stored_epochs(trial, tracker.run_id, checkpoint_path(tracker.run_id))
        result = train(cfg, data, [tracker, ReportToOptuna(trial)], checkpoint=checkpoint_path(tracker.run_id))
    return record_result(trial, result)


def run_stacked(study: optuna.Study, taken: list[Claim], experiment: str, parent_run_id: str | None) -> None:
    """Train claimed cells, those that differ only in seed as one stacked model; tell every trial its outcome."""
    untold, groups = [claimed.trial for claimed in taken], {}
    with contextlib.ExitStack() as beating:
        for trial in untold:  # RDB storages: heartbeats as study.optimize would send them, for groups waiting their turn too
            beating.enter_context(heartbeat(study, trial))
        try:
            for claimed in taken:
                if tell_adopted(study, claimed.trial, claimed.cell):
                    untold.remove(claimed.trial)
                else:
                    groups.setdefault(group_key(claimed.cell), []).append(claimed)
            for members in groups.values():
                for claimed, result in zip(members, train_group(members, experiment, parent_run_id)):
                    study.tell(claimed.trial, record_result(claimed.trial, result))
                    untold.remove(claimed.trial)
        except BaseException:  # SIGTERM/Ctrl-C too: every trial not told fails, and the worker gives its cell back
            for trial in untold:
                study.tell(trial, state=TrialState.FAIL)
            raise


def train_group(members: list[Claim], experiment: str, parent_run_id: str | None) -> list:
    """Train cells that differ only in seed as one stacked model, each tracked as its own run; their results."""
    with contextlib.ExitStack() as stack:
        runs = [cell_run(m.trial, m.cell, experiment, parent_run_id) for m in members]
        trackers = [stack.enter_context(run.tracker) for run in runs]
        for m, tracker in zip(members, trackers):
            m.trial.set_user_attr(RUN_ID_ATTR, tracker.run_id)
            m.trial.set_user_attr("stacked", len(members))
        results = train_stacked([run.cfg for run in runs], runs[0].data,
                                [[tr, ReportToOptuna(m.trial)] for m, tr in zip(members, trackers)])
        stack.pop_all()  # trained to the end: each run ends on its own, not FAILED on the store failure of another's end
    end_each(trackers)
    return results


def end_each(trackers: list) -> None:
    """End every run of a group that trained to its end; then raise the first error an end raised (the store away:
    its writes spooled), so that one member's failed end is not the others' too."""
    errors = []
    for tracker in reversed(trackers):
        try:
            tracker.__exit__(None, None, None)
        except BaseException as e:  # SIGTERM too: the remaining ends still spool what the store did not take
            errors.append(e)
    if errors:
        raise errors[0]


def work(storage_spec: str, name: str, experiment: str, threads: int | None = None, stack: int = 1) -> None:
    """Worker loop: run queued cells (up to `stack` seeds at once as one model) until none is queued or running anywhere."""
    study = open_study(storage_spec, name)  # a study that is not there: nothing made, not even a store
    start_worker(threads)
    check_pruner(stored_pruner(study), SWEEP_PRUNER, stack)
    parent, experiment = parent_and_experiment(study, experiment)
    serve(study, lambda: work_queue(study, experiment, parent, stack))


def work_queue(study: optuna.Study, experiment: str, parent: str | None, stack: int) -> None:
    """Claim and train queued cells until none is queued or running anywhere."""
    while True:
        recover_dead_workers(study)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)  # RDB heartbeats: requeues cells of workers dead on other machines
        counts = state_counts(study)
        if counts["waiting"] and stack > 1:
            run_stacked(study, claim(study, stack), experiment, parent)
        elif counts["waiting"]:
            study.optimize(lambda t: objective(t, experiment, parent), n_trials=1)
        elif counts["running"]:
            time.sleep(IDLE_SECONDS)
        else:
            return


def wait_with_progress(study: optuna.Study, procs: list[subprocess.Popen], started: float, done_before: int) -> None:
    """Print cells done/total and an ETA until every worker has exited."""
    last = None
    while [p.poll() for p in procs].count(None):  # poll every worker: it also reaps dead ones
        with contextlib.suppress(subprocess.TimeoutExpired):  # back at once when that worker exits
            next(p for p in procs if p.poll() is None).wait(POLL_SECONDS)
        c = state_counts(study)
        line = f"[sweep] {c['done']}/{c['total']} cells done, {c['running']} running, {c['waiting']} queued"
        new = c["done"] - done_before
        if new > 0:
            line += f", ETA {(time.time() - started) / new * (c['total'] - c['done']) / 60:.1f} min"
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line


def start_parent_run(study: optuna.Study, experiment: str) -> mlflow.ActiveRun:
    """The sweep's parent MLflow run: the `mlflow run` project run, else the one an earlier invocation made in this
    experiment, else new (an earlier one in another experiment, e.g. `mlflow run`'s Default, cannot be resumed here)."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.start_run()
    experiment_id = mlflow.set_experiment(experiment).experiment_id
    earlier = study.user_attrs.get(PARENT_RUN_ATTR)
    if earlier and mlflow.search_runs(experiment_names=[experiment], filter_string=f"attributes.run_id = '{earlier}'").shape[0]:
        return mlflow.start_run(run_id=earlier)
    return mlflow.start_run(run_name=study.study_name, parent_run_id=nested_under(experiment_id))


def run_sweep(args: argparse.Namespace) -> int:
    """Validate, create or resume the study, enqueue missing cells, run workers, summarise."""
    settings = train_settings(args)
    cells = make_cells(args.configs, args.seeds, args.lrs, args.widths, args.depths, args.warmup_epochs, settings)
    check_cells(cells, settings)
    check_tracking()  # first: a bad store makes no study; then a bad storage (open_study) makes no store
    name = args.study or sweep_name(args.storage, cells, settings, args.pruner)
    study = open_study(args.storage, name, cells, settings, args.pruner)  # a bad storage fails here, before the MLflow store is made
    ready_store()  # before anything touches MLflow: coordinators may start together on a fresh store
    recover_dead_workers(study)
    unrecorded = check_records(study)
    if unrecorded:
        print(f"[sweep] {unrecorded} done cells have no FINISHED run in {mlflow.get_tracking_uri()}: queued again",
              file=sys.stderr)
    queued = enqueue_missing(study)
    before = state_counts(study)
    print(f"[sweep] study '{name}' in {args.storage}: {before['total']} cells, {before['done']} already done, "
          f"{queued} queued now", file=sys.stderr)
    with parent_run(start_parent_run(study, args.experiment)) as parent:
        mlflow.set_tags({SWEEP_TAG: name, "optuna_storage": args.storage, "cells": str(before["total"]), MLFLOW_RUN_NAME: name,
                         PRUNER_ATTR: args.pruner})
        study.set_user_attr(PARENT_RUN_ATTR, parent.info.run_id)
        started = time.time()
        run_rounds(study, args, started, before["done"])
        table = summary(study)
        mlflow.log_text(table.to_csv(index=False), "sweep_summary.csv")
        from experiments.study_figures import log_study_figures  # here: the workers run this module and never draw

        log_study_figures(table)
        after = state_counts(study)
        mlflow.log_metrics({"sweep/cells_done": after["done"], "sweep/wall_seconds": time.time() - started}, step=0)
    print_summary(table, after, time.time() - started)
    return 0 if after["done"] == after["total"] else 1


def run_rounds(study: optuna.Study, args: argparse.Namespace, started: float, done_before: int) -> None:
    """Worker rounds until no cell is queued; on SIGTERM/Ctrl-C the workers give their cells back, the parent ends KILLED."""
    for _ in range(3):  # a round per batch of workers; a worker killed mid-round leaves its cell to the next
        procs = spawn("experiments.sweep", ["--study", study.study_name, "--storage", args.storage,
                                            "--experiment", args.experiment, "--stack", str(args.stack)], args.workers,
                      args.device)
        join_workers(procs, lambda ps: wait_with_progress(study, ps, started, done_before))
        recover_dead_workers(study)
        enqueue_missing(study)  # cells whose retries ran out get one more chance next round
        if not state_counts(study)["waiting"]:
            return


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run (or resume) a grid")
    run.add_argument("--configs", default="no_tricks,batchnorm,layernorm,all_tricks")
    run.add_argument("--seeds", default="0")
    run.add_argument("--lrs", default="", help="comma list; empty = each config's own LR")
    run.add_argument("--widths", default="")
    run.add_argument("--depths", default="")
    run.add_argument("--warmup-epochs", default="")
    for flag in TRAIN_FLAGS:
        run.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None)
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--study", default="", help="default: derived from the grid and settings (same command = resume)")
    run.add_argument("--pruner", default=SWEEP_PRUNER, help=f"{', '.join(PRUNERS)}: may stop a cell after an epoch")
    for p in (run, sub.add_parser("work", help="join a sweep as one more worker")):
        p.add_argument("--storage", default=DEFAULT_STORAGE, help="journal file path (default) or RDB URL")
        p.add_argument("--experiment", default=DEFAULT_EXPERIMENT)
        p.add_argument("--stack", type=int, default=1,
                       help="train up to K seeds of a cell as one stacked model (pays on GPUs; see benchmarks/stacked_speed)")
    work_parser = sub.choices["work"]
    work_parser.add_argument("--study", required=True)
    work_parser.add_argument("--threads", type=int, default=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # "Using an existing study": our own lines say what it opened
    return exit_code(lambda: run_command(args), (SweepError, ConfigError, DataError),
                     "running cells ended KILLED and went back to the queue: the same command resumes")


def run_command(args: argparse.Namespace) -> int:
    """`work` or `run`, after the checks that need no storage."""
    if args.stack < 1:  # work's too: joiners are started by hand
        raise SweepError(f"stack={args.stack} must be >= 1")
    if args.command == "work":
        work(args.storage, args.study, args.experiment, args.threads, args.stack)
        return 0
    if args.workers < 1:
        raise SweepError(f"workers={args.workers} must be >= 1")
    args.pruner = check_pruner(args.pruner, SWEEP_PRUNER, args.stack)
    return run_sweep(args)


if __name__ == "__main__":
    exit_now(main())
