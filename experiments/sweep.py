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
import hashlib
import itertools
import json
import os
import subprocess
import sys
import time
import warnings

import mlflow
import optuna
import pandas as pd
import torch
from optuna.storages._heartbeat import get_heartbeat_thread  # what study.optimize uses; ask/tell has none
from optuna.trial import TrialState

from cookbook import resources
from cookbook.config import CONFIGS_DIR, ConfigError, available_configs, load_config
from cookbook.data import DataError, load_mnist
from cookbook.stacked import train_stacked
from cookbook.stop import exit_code, process_id
from cookbook.tracking import DEFAULT_EXPERIMENT, REPO, MlflowTracker, ready_store
from cookbook.train import train
from experiments.storage import (
    DEFAULT_STORAGE,
    SweepError,
    check_records,
    give_back,
    open_storage,
    recorded_trials,
    recover_dead_workers,
)

GRID = ("config", "seed", "lr", "width", "depth", "warmup_epochs")  # cell fields, in key order
TRAIN_FLAGS = ("epochs", "batch_size", "train_subset", "test_subset", "device", "data_dir", "precision")  # shared by every cell
CONFIG_KEYS = {"seed": "seed", "lr": "optim.lr", "width": "model.width", "depth": "model.depth",
               "warmup_epochs": "schedule.warmup_epochs", "epochs": "epochs", "batch_size": "data.batch_size",
               "train_subset": "data.train_subset", "test_subset": "data.test_subset", "device": "device",
               "data_dir": "data.data_dir", "precision": "compute.precision"}
POLL_SECONDS = 2.0


def parse_list(text: str | None, kind: type, name: str) -> list:
    """'1e-3,3e-3' -> [0.001, 0.003]; empty -> [None] (= as each config says)."""
    if text in (None, ""):
        return [None]
    try:
        values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    except ValueError:
        raise SweepError(f"{name}={text!r}: every value must be a {kind.__name__}") from None
    if not values:
        raise SweepError(f"{name}={text!r} is an empty list")
    return values


def config_names(text: str) -> list[str]:
    """A comma list of config names, each one a file in experiments/configs/."""
    names, known = parse_list(text, str, "configs"), available_configs(CONFIGS_DIR)
    for name in names:
        if name not in known:
            raise SweepError(f"unknown config '{name}' in configs; available: {', '.join(known)}")
    return names


def train_settings(args: argparse.Namespace) -> dict:
    """The training flags given on the command line (shared by every cell or trial), typed."""
    settings = {f: getattr(args, f) for f in TRAIN_FLAGS if getattr(args, f) not in (None, "")}
    for field in ("epochs", "batch_size", "train_subset", "test_subset"):
        if field in settings:
            settings[field] = parse_list(settings[field], int, field)[0]
    return settings


def worker_env() -> dict[str, str]:
    """Environment for worker processes: this tracking URI and code, but not the parent's run."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def make_cells(configs: str, seeds: str, lrs: str, widths: str = "", depths: str = "", warmups: str = "") -> list[dict]:
    """Every combination of the lists, each checked by resolving its config (bad values fail here, before any work)."""
    lists = [config_names(configs), parse_list(seeds, int, "seeds"), parse_list(lrs, float, "lrs"), parse_list(widths, float, "widths"),
             parse_list(depths, int, "depths"), parse_list(warmups, float, "warmup_epochs")]
    cells = [dict(zip(GRID, combo)) for combo in itertools.product(*lists)]
    for cell in cells:
        load_config(cell["config"], CONFIGS_DIR, overrides(cell, {}))
    return cells


def check_cells(cells: list[dict], settings: dict) -> None:
    """Every cell's config with the shared settings is valid and fits this machine's device (one line otherwise)."""
    for cell in cells:
        resources.check(load_config(cell["config"], CONFIGS_DIR, overrides(cell, settings)))


def cell_key(cell: dict) -> str:
    """Stable readable id, e.g. 'all_tricks seed=0 lr=0.001' (fields left to the config are omitted)."""
    return " ".join([cell["config"]] + [f"{k}={cell[k]:g}" for k in GRID[1:] if cell.get(k) is not None])


def group_key(cell: dict) -> str:
    """Cells with the same group key differ only in seed and can train as one stacked model."""
    return cell_key({**cell, "seed": None})


def overrides(cell: dict, settings: dict) -> dict:
    """Nested config overrides for one cell plus the sweep-wide training settings."""
    nested: dict = {}
    for field, value in {**settings, **cell}.items():
        if field == "config" or value in (None, ""):
            continue
        *parents, leaf = CONFIG_KEYS[field].split(".")
        node = nested
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return nested


def study_name(cells: list[dict], settings: dict) -> str:
    """Same grid and settings -> same study, which is what makes a rerun resume."""
    digest = hashlib.sha1(json.dumps([cells, settings], sort_keys=True).encode()).hexdigest()[:10]
    return f"sweep-{digest}"


def open_study(storage_spec: str, name: str, cells: list[dict] | None = None, settings: dict | None = None) -> optuna.Study:
    """Create (with the grid stored on it) or load the sweep's study."""
    storage = open_storage(storage_spec)
    if cells is None:
        try:
            return optuna.load_study(study_name=name, storage=storage)
        except KeyError:
            raise SweepError(f"no study '{name}' in storage '{storage_spec}'") from None
    study = optuna.create_study(study_name=name, storage=storage, direction="minimize", load_if_exists=True)
    if "cells" not in study.user_attrs:
        study.set_user_attr("cells", cells)
        study.set_user_attr("settings", settings)
    return study


def enqueue_missing(study: optuna.Study) -> int:
    """Enqueue every cell that is neither finished nor queued nor running; return how many."""
    keys = [cell_key(c) for c in study.user_attrs["cells"]]
    taken = {t.user_attrs.get("queued_cell")
             for t in recorded_trials(study) + study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))}
    missing = [k for k in keys if k not in taken]
    cells = {cell_key(c): c for c in study.user_attrs["cells"]}
    missing.sort(key=lambda k: (group_key(cells[k]), cells[k]["seed"] or 0))  # seeds of a group side by side, for --stack
    for key in missing:
        study.enqueue_trial({"cell": key}, user_attrs={"queued_cell": key})
    return len(missing)


@functools.lru_cache(maxsize=2)
def cached_mnist(data_dir: str, train_subset: int | None, test_subset: int | None):
    return load_mnist(data_dir, train_subset, test_subset)


def is_duplicate(study: optuna.Study, trial: optuna.Trial, key: str) -> bool:
    """Another trial already finished this cell or is running it (possible only if a cell was enqueued twice)."""
    for other in recorded_trials(study) + study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if other.number != trial.number and other.user_attrs.get("queued_cell") == key:
            return True
    return False


def take_cell(trial: optuna.Trial) -> dict:
    """Mark the trial as this worker's, name its cell as the trial's param; prune strays and duplicates."""
    trial.set_user_attr("worker", process_id())
    if "queued_cell" not in trial.user_attrs:  # the queue was empty when this trial started: nothing to do
        raise optuna.TrialPruned("not a queued cell")
    cells = {cell_key(c): c for c in trial.study.user_attrs["cells"]}
    key = trial.suggest_categorical("cell", list(cells))
    for field, value in cells[key].items():  # readable columns in optuna-dashboard
        trial.set_user_attr(field, value)
    if is_duplicate(trial.study, trial, key):
        raise optuna.TrialPruned(f"duplicate of a finished or running '{key}'")
    return cells[key]


def cell_tracker(trial: optuna.Trial, cell: dict, experiment: str, parent_run_id: str | None):
    """The cell's resolved config, its data and its nested MLflow run (as a tracker not yet entered)."""
    study = trial.study
    cfg = load_config(cell["config"], CONFIGS_DIR, overrides(cell, study.user_attrs["settings"]))
    data = cached_mnist(cfg.data.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    key = cell_key(cell)
    tags = {"sweep": study.study_name, "trial": str(trial.number), "cell": key}
    return cfg, data, MlflowTracker(cfg, data.md5, experiment=experiment, run_name=key, system_metrics=False,
                                    extra_tags=tags, parent_run_id=parent_run_id, base=load_config(cell["config"], CONFIGS_DIR))


def record_result(trial: optuna.Trial, result) -> float:
    """Store the outcome on the trial; the objective value is the final train loss (inf if it diverged)."""
    trial.set_user_attr("diverged", result.diverged)
    trial.set_user_attr("steps_run", result.steps_run)
    for name, value in result.final.items():
        trial.set_user_attr(name, value)
    return float("inf") if result.diverged else result.final["epoch/train_loss"]


def objective(trial: optuna.Trial, experiment: str, parent_run_id: str | None) -> float:
    """Train one queued cell, tracked as a nested MLflow run."""
    cfg, data, tracker = cell_tracker(trial, take_cell(trial), experiment, parent_run_id)
    with tracker:
        trial.set_user_attr("mlflow_run_id", tracker.run_id)
        result = train(cfg, data, [tracker])
    return record_result(trial, result)


def claim(study: optuna.Study, k: int) -> list[optuna.Trial]:
    """Take up to k queued cells (ask() pops the oldest queued trial), pruning strays and duplicates."""
    taken = []
    while len(taken) < k and state_counts(study)["waiting"]:
        trial = study.ask()
        try:
            taken.append((trial, take_cell(trial)))
        except optuna.TrialPruned:
            study.tell(trial, state=TrialState.PRUNED)
    return taken


def run_stacked(study: optuna.Study, taken: list, experiment: str, parent_run_id: str | None) -> None:
    """Train claimed cells, those that differ only in seed as one stacked model; tell every trial its outcome."""
    groups: dict[str, list] = {}
    for trial, cell in taken:
        groups.setdefault(group_key(cell), []).append((trial, cell))
    for members in groups.values():
        trials = [t for t, _ in members]
        with contextlib.ExitStack() as stack:
            for t in trials:  # RDB storages: heartbeats as study.optimize would send them
                stack.enter_context(get_heartbeat_thread(t._trial_id, study._storage))
            try:
                parts = [cell_tracker(t, c, experiment, parent_run_id) for t, c in members]
                trackers = [stack.enter_context(tracker) for _, _, tracker in parts]
                for t, tracker in zip(trials, trackers):
                    t.set_user_attr("mlflow_run_id", tracker.run_id)
                    t.set_user_attr("stacked", len(trials))
                results = train_stacked([cfg for cfg, _, _ in parts], parts[0][1], [[tr] for tr in trackers])
            except BaseException:  # SIGTERM/Ctrl-C too: the trials fail and the worker gives their cells back
                for t in trials:
                    study.tell(t, state=TrialState.FAIL)
                raise
        for t, result in zip(trials, results):
            study.tell(t, record_result(t, result))


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Cells done / queued / running (duplicates and strays not counted)."""
    trials = study.get_trials(deepcopy=False)
    done = {t.params["cell"] for t in recorded_trials(study)}
    return {"done": len(done), "total": len(study.user_attrs["cells"]),
            "waiting": sum(t.state == TrialState.WAITING for t in trials),
            "running": sum(t.state == TrialState.RUNNING for t in trials)}


def work(storage_spec: str, name: str, experiment: str, threads: int | None = None, stack: int = 1) -> None:
    """Worker loop: run queued cells (up to `stack` seeds at once as one model) until none is queued or running anywhere."""
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    ready_store()
    study = open_study(storage_spec, name)
    parent = study.user_attrs.get("mlflow_parent_run_id")
    if parent:  # cells live beside their parent, e.g. in the experiment `mlflow run --experiment-name` chose
        experiment = mlflow.get_experiment(mlflow.get_run(parent).info.experiment_id).name
    try:
        work_queue(study, experiment, parent, stack)
    except KeyboardInterrupt:
        give_back(study)
        raise


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
            time.sleep(POLL_SECONDS)
        else:
            return


def spawn_workers(n: int, storage_spec: str, name: str, experiment: str, stack: int = 1) -> list[subprocess.Popen]:
    """n worker processes sharing this machine's cores; they must not resume the parent run."""
    threads = max(1, (os.cpu_count() or 1) // n)
    cmd = [sys.executable, "-m", "experiments.sweep", "work", "--study", name, "--storage", storage_spec,
           "--experiment", experiment, "--threads", str(threads), "--stack", str(stack)]
    return [subprocess.Popen(cmd, env=worker_env()) for _ in range(n)]


def join_workers(procs: list[subprocess.Popen], wait) -> None:
    """wait(procs); on SIGTERM/Ctrl-C stop the workers the same way (they end their runs KILLED and give their cells
    back), wait for them, and end this process's parent run KILLED."""
    try:
        wait(procs)
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        mlflow.end_run("KILLED")
        raise


def wait_with_progress(study: optuna.Study, procs: list[subprocess.Popen], started: float, done_before: int) -> None:
    """Print cells done/total and an ETA until every worker has exited."""
    last = None
    while [p.poll() for p in procs].count(None):  # poll every worker: it also reaps dead ones
        time.sleep(POLL_SECONDS)
        c = state_counts(study)
        line = f"[sweep] {c['done']}/{c['total']} cells done, {c['running']} running, {c['waiting']} queued"
        new = c["done"] - done_before
        if new > 0:
            line += f", ETA {(time.time() - started) / new * (c['total'] - c['done']) / 60:.1f} min"
        if line != last:
            print(line, file=sys.stderr, flush=True)
            last = line


def summary(study: optuna.Study) -> pd.DataFrame:
    """One row per finished cell, from the study's records."""
    rows = []
    for t in recorded_trials(study):
        rows.append({**{k: t.user_attrs.get(k) for k in ("config", "seed", "lr", "width", "depth", "warmup_epochs")},
                     "cell": t.params["cell"], "final_loss": t.user_attrs.get("epoch/train_loss"),
                     "test_acc": t.user_attrs.get("test/acc"), "diverged": t.user_attrs.get("diverged"),
                     "mlflow_run_id": t.user_attrs.get("mlflow_run_id")})
    return pd.DataFrame(rows)


def start_parent_run(study: optuna.Study, experiment: str) -> mlflow.ActiveRun:
    """The sweep's parent MLflow run: the `mlflow run` project run, else the one an earlier invocation made, else new."""
    if os.environ.get("MLFLOW_RUN_ID"):
        return mlflow.start_run()
    mlflow.set_experiment(experiment)
    earlier = study.user_attrs.get("mlflow_parent_run_id")
    if earlier and mlflow.search_runs(search_all_experiments=True, filter_string=f"attributes.run_id = '{earlier}'").shape[0]:
        return mlflow.start_run(run_id=earlier)
    return mlflow.start_run(run_name=study.study_name)


def run_sweep(args: argparse.Namespace) -> int:
    """Validate, create or resume the study, enqueue missing cells, run workers, summarise."""
    cells = make_cells(args.configs, args.seeds, args.lrs, args.widths, args.depths, args.warmup_epochs)
    settings = train_settings(args)
    check_cells(cells, settings)
    name = args.study or study_name(cells, settings)
    study = open_study(args.storage, name, cells, settings)  # a bad storage fails here, before the MLflow store is made
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
    with start_parent_run(study, args.experiment) as parent:
        mlflow.set_tags({"sweep": name, "optuna_storage": args.storage, "cells": str(before["total"]), "mlflow.runName": name})
        study.set_user_attr("mlflow_parent_run_id", parent.info.run_id)
        started = time.time()
        run_rounds(study, args, started, before["done"])
        table = summary(study)
        mlflow.log_text(table.to_csv(index=False), "sweep_summary.csv")
        after = state_counts(study)
        mlflow.log_metrics({"sweep/cells_done": after["done"], "sweep/wall_seconds": time.time() - started}, step=0)
    print_summary(table, after, time.time() - started)
    return 0 if after["done"] == after["total"] else 1


def run_rounds(study: optuna.Study, args: argparse.Namespace, started: float, done_before: int) -> None:
    """Worker rounds until no cell is queued; on SIGTERM/Ctrl-C the workers give their cells back, the parent ends KILLED."""
    for _ in range(3):  # a round per batch of workers; a worker killed mid-round leaves its cell to the next
        procs = spawn_workers(args.workers, args.storage, study.study_name, args.experiment, args.stack)
        join_workers(procs, lambda ps: wait_with_progress(study, ps, started, done_before))
        recover_dead_workers(study)
        enqueue_missing(study)  # cells whose retries ran out get one more chance next round
        if not state_counts(study)["waiting"]:
            return


def print_summary(table: pd.DataFrame, counts: dict, seconds: float) -> None:
    """One screen: mean final loss over seeds per config and LR, diverged cells counted."""
    print(f"\n{counts['done']}/{counts['total']} cells done in {seconds / 60:.1f} min")
    if table.empty:
        return
    table = table.assign(lr=table.lr.fillna("config"), diverged=table.diverged.astype(bool))
    grouped = table.groupby(["config", "lr"], dropna=False).agg(
        seeds=("cell", "count"), final_loss=("final_loss", "mean"), test_acc=("test_acc", "mean"),
        diverged=("diverged", "sum"))
    print(grouped.to_string(float_format=lambda v: f"{v:.4f}"))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m experiments.sweep", description=__doc__.splitlines()[0])
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
    return exit_code(lambda: run_command(args), (SweepError, ConfigError, DataError),
                     "running cells ended KILLED and went back to the queue: the same command resumes")


def run_command(args: argparse.Namespace) -> int:
    """`work` or `run`, after the checks that need no storage."""
    if args.command == "work":
        work(args.storage, args.study, args.experiment, args.threads, args.stack)
        return 0
    if args.workers < 1:
        raise SweepError(f"workers={args.workers} must be >= 1")
    if args.stack < 1:
        raise SweepError(f"stack={args.stack} must be >= 1")
    return run_sweep(args)


if __name__ == "__main__":
    sys.exit(main())
