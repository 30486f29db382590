"""Worker processes of sweeps and stress studies: how they start, share data and stop together."""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import subprocess
import sys
from collections.abc import Callable

import mlflow
import optuna
import torch
from mlflow.exceptions import MlflowException

from cookbook.data import load_mnist
from cookbook.errors import StoreFailure
from cookbook.resources import visible_gpus
from cookbook.stop import process_id
from cookbook.tracking import PROCESS_TAG, REPO, ready_store
from experiments.storage import PARENT_RUN_ATTR, give_back

WORKER_INDEX_ENV = "COOKBOOK_WORKER_INDEX"  # which of the coordinator's workers a process is (0, 1, ...)
PARENT_RUN_ENV = "COOKBOOK_PARENT_RUN_ID"  # a study's phases: the `mlflow run` project run their parent runs nest under


def nested_under(experiment_id: str) -> str | None:
    """The run a coordinator's parent run is to be nested under (a study's project run): only a live RUNNING run of this
    experiment (a value left in the environment must not hide the run under another experiment's run, or fail it)."""
    run_id = os.environ.get(PARENT_RUN_ENV)
    try:
        run = mlflow.get_run(run_id) if run_id else None
    except MlflowException:
        run = None
    if run is None or (run.info.lifecycle_stage, run.info.status, run.info.experiment_id) != ("active", "RUNNING", experiment_id):
        if run_id:
            print(f"[{PARENT_RUN_ENV}={run_id} is not a running run of this experiment: the parent run is not nested]",
                  file=sys.stderr)
        return None
    return run_id


def worker_index() -> int:
    """This worker's number among its coordinator's (0 outside a worker): what makes its random draws its own."""
    return int(os.environ.get(WORKER_INDEX_ENV, "0"))


def worker_env(gpu: str | None = None, index: int = 0) -> dict[str, str]:
    """Environment for worker number `index`: this tracking URI and code, not the parent's run; given `gpu`, that GPU
    alone."""
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")}
    env["MLFLOW_TRACKING_URI"] = mlflow.get_tracking_uri()
    env[WORKER_INDEX_ENV] = str(index)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    return env


def gpu_assignment(n_workers: int, visible: list[str]) -> list[str | None]:
    """The GPU id each worker gets, round robin over `visible` (several workers share one when there are more workers
    than GPUs); None for all when there is no GPU."""
    return [visible[i % len(visible)] if visible else None for i in range(n_workers)]


def spawn(module: str, args: list[str], n: int, device: str | None = None) -> list[subprocess.Popen]:
    """n `python -m module work ARGS --threads T` processes sharing this machine's cores and, each seeing one, its GPUs;
    a `device` that names a GPU (cuda:1) keeps them all visible, so that every worker trains on the one asked for."""
    threads = max(1, (os.cpu_count() or 1) // n)
    cmd = [sys.executable, "-m", module, "work", *args, "--threads", str(threads)]
    pinned = ":" in (device or "")
    gpus = gpu_assignment(n, [] if pinned else visible_gpus())
    return [subprocess.Popen(cmd, env=worker_env(gpu, i)) for i, gpu in enumerate(gpus)]


def join_workers(procs: list[subprocess.Popen], wait: Callable[[list[subprocess.Popen]], object]) -> None:
    """wait(procs); on SIGTERM/Ctrl-C stop the workers the same way (they end their runs KILLED and give their cells
    back) and wait for them (parent_run then ends the coordinator's run KILLED)."""
    try:
        wait(procs)
    except KeyboardInterrupt:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
        raise


@contextlib.contextmanager
def parent_run(active: mlflow.ActiveRun):
    """A coordinator's parent run, ended KILLED (not FAILED, MLflow's end for an exception) when SIGTERM or Ctrl-C
    stops the coordinator anywhere inside it: waiting for its workers, or summarising after them. It names the
    coordinator's process, so that `sync` ends it KILLED if the coordinator dies without a word (SIGKILL, the store away)."""
    with active as run:
        mlflow.set_tag(PROCESS_TAG, process_id())
        try:
            yield run
        except KeyboardInterrupt:
            mlflow.end_run("KILLED")
            raise


@functools.lru_cache(maxsize=2)
def cached_mnist(data_dir: str, train_subset: int | None, test_subset: int | None):
    return load_mnist(data_dir, train_subset, test_subset)


def start_worker(threads: int | None) -> None:
    """A worker's process set-up: its share of the cores, quiet Optuna and system metrics, the tracking store ready."""
    if threads:
        torch.set_num_threads(threads)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    for handler in optuna.logging.get_logger("optuna").handlers:  # Optuna's own stderr handler
        handler.addFilter(QuietOnStop())
    logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # 4 INFO lines a cell would bury the progress
    ready_store()


class QuietOnStop(logging.Filter):
    """Drops what Optuna logs from a SIGTERM/Ctrl-C or a failed tracking store on: its warning with the traceback of the
    trial it failed (20-55 lines a worker) and what follows. The worker says it in one line, and gives the trial back."""

    def __init__(self):
        super().__init__()
        self.stopped = False

    def filter(self, record: logging.LogRecord) -> bool:
        self.stopped = self.stopped or bool(record.exc_info and isinstance(record.exc_info[1], (KeyboardInterrupt, StoreFailure)))
        return not self.stopped


def parent_and_experiment(study: optuna.Study, experiment: str) -> tuple[str | None, str]:
    """The study's parent MLflow run and the experiment its runs go to: the parent's (e.g. the one `mlflow run
    --experiment-name` chose), else `experiment`."""
    parent = study.user_attrs.get(PARENT_RUN_ATTR)
    return parent, run_experiment(parent) if parent else experiment


def run_experiment(run_id: str) -> str:
    """The name of the experiment a run is in."""
    return mlflow.get_experiment(mlflow.get_run(run_id).info.experiment_id).name


def serve(study: optuna.Study, loop: Callable[[], None]) -> None:
    """Run a worker's loop; if SIGTERM/Ctrl-C or a failed tracking store stops it, queue what it was training again
    before exiting (a stress study has no coordinator that would: the point would be lost)."""
    try:
        loop()
    except (KeyboardInterrupt, StoreFailure):  # the store's failure is no fault of the point: its retry takes the run
        give_back(study)  # once the spool is stored (adopt.orphaned_run), or trains it
        raise
