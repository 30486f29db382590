"""MLflow tracking as a training hook: params, tags, batched async metrics, artifacts."""
from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import io
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Param, RunTag
from mlflow.exceptions import MlflowException
from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID, MLFLOW_RUN_NAME, MLFLOW_RUN_NOTE

from .checkpoint import checkpoint_path
from .config import DEFAULT_EXPERIMENT, Config, overridden_keys, to_params, to_yaml
from .delivery import FLUSH_TIMEOUT, StoreWriter, first_line, metrics_op, spool_path, write_spool
from .errors import StoreFailure, StoreUnusable
from .hooks import Hook
from .logged import dataset_ids, dataset_inputs, save_model
from .monitor import STEP_LOSS
from .resources import gpu_label
from .sampler import STOP_TIMEOUT, start_sampler, stop_sampler
from .stop import at_most, process_id, stopped_by
from .ui import mark_training

SNAPSHOT_ARTIFACT = "grad_norms/snapshots.csv"
SNAPSHOT_COLUMNS = ["step", "param", "numel", "grad_norm", "weight_norm"]
CONFIG_ARTIFACT = "config.yaml"
# Tags analysis reads (it imports these names; nobody retypes them).
CONFIG_TAG, SEED_TAG, DIVERGED_TAG, DIVERGED_STEP_TAG = "config", "seed", "diverged", "diverged_step"
PARAM_COUNT_TAG, STEPS_RUN_TAG, TOTAL_STEPS_TAG = "param_count", "steps_run", "total_steps"
PROCESS_TAG = "process"  # host:pid of the training process: `sync` closes RUNNING runs whose process is gone
SPOOL_TAG = "spool_file"  # where the run's writes go while the store is away: `resume` checks there, from any folder
STOPPED_BY_TAG = "stopped_by"  # SIGTERM or SIGINT on a run a signal stopped: kept where MLflow's `mlflow run` sets FAILED
PRUNED_TAG = "pruned"  # "true" on a run a study's pruner stopped (it ends FINISHED with the steps it ran)


def whereabouts(run_id: str) -> dict[str, str]:
    """The tags saying which process trains the run now and where it spools: set when it starts and when it resumes."""
    return {PROCESS_TAG: process_id(), SPOOL_TAG: str(spool_path(run_id).resolve())}
GPU_TAG = "gpu"  # the physical GPU a CUDA run trained on (inside a sweep worker "cuda:0" is whichever GPU it was given)
THREADS_TAG, DEVICE_TAG, TORCH_TAG = "torch_threads", "device", "torch_version"  # what reproduce matches
OVERRIDES_TAG = "overrides"  # comma list of the config keys the run sets differently from its config file; "" = none
REPO = Path(__file__).resolve().parent.parent
MIN_FREE_BYTES = 64 << 10  # less than this and not even the run's params and first batches fit
SQLITE_HEADER = b"SQLite format 3\0"  # the first 16 bytes of every SQLite database


def git_state(repo: Path = REPO) -> tuple[str, bool]:
    """(commit, dirty) of the code being run; ('unknown', False) outside git."""
    try:
        commit = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        status = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                capture_output=True, text=True, check=True).stdout
        return commit, bool(status.strip())
    except (OSError, subprocess.CalledProcessError):
        return "unknown", False


def ready_store(uri: str | None = None) -> None:
    """A SQLite store's tables made once, under a lock: processes starting together raced in MLflow's migrations."""
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):  # server and database stores are set up by whoever runs them
        _create_sqlite_store(uri)


def check_tracking(uri: str | None = None) -> None:
    """The tracking store checked before anything is made (a sweep's study included): a SQLite file's folder writable, or
    a store MLflow can open for another scheme; else a one-line StoreUnusable."""
    uri = uri or mlflow.get_tracking_uri()
    if (path := sqlite_file(uri)) is not None:
        check_sqlite(uri, path.resolve())
        return check_writable(uri, path.resolve())
    try:
        MlflowClient(uri)
    except Exception as e:  # an unknown scheme (MlflowException), a database it cannot reach (SQLAlchemy's many types)
        raise StoreUnusable(f"tracking store {uri} cannot be used ({first_line(e)})") from None


def sqlite_file(uri: str) -> Path | None:
    """A SQLite store's file (None for a server or database store)."""
    return Path(uri.removeprefix("sqlite:///").split("?")[0]) if uri.startswith("sqlite:///") else None


def store_unreadable(uri: str) -> str | None:
    """Why, in one line, runs cannot be read from a SQLite store: its file does not exist (MLflow would make an empty
    one there and find nothing in it). None where they can, once a process making its tables is done (a reader
    racing MLflow's migrations fails), or where the store is not SQLite. For the commands that read runs."""
    path = sqlite_file(uri)
    if path is not None and not path.is_file():
        return f"no tracking store at {uri}; point MLFLOW_TRACKING_URI at the store the runs are in"
    if path is not None:
        with contextlib.suppress(FileNotFoundError), open(store_lock(path)) as lock:  # none: nobody made it through ready_store
            fcntl.flock(lock, fcntl.LOCK_SH)  # waits while ready_store holds it (read-only: another user's lock file opens)
    return None


def check_writable(uri: str, path: Path) -> None:
    """A SQLite store needs its file and folder writable (SQLite writes a journal beside the file) and some free space."""
    folder = path.parent
    if not folder.is_dir():
        raise StoreUnusable(f"tracking store {uri}: folder {folder} does not exist")
    for target in (folder, path) if path.exists() else (folder,):
        if not os.access(target, os.W_OK):
            raise StoreUnusable(f"tracking store {uri} is read-only ({target} cannot be written); "
                                "point MLFLOW_TRACKING_URI at a writable store")
    free = shutil.disk_usage(folder).free
    if free < MIN_FREE_BYTES:
        raise StoreUnusable(f"tracking store {uri} is full ({free // 1024} KiB free in {folder})")


def check_sqlite(uri: str, path: Path) -> None:
    """A file already there (not empty) must be a SQLite database, by its header: else MLflow's error is 80 lines."""
    with contextlib.suppress(FileNotFoundError, IsADirectoryError), open(path, "rb") as file:  # the header only
        if file.read(len(SQLITE_HEADER)) not in (SQLITE_HEADER, b""):
            raise StoreUnusable(f"tracking store {uri}: {path} is not a SQLite database")


@functools.cache  # once per store and process: every tracker and sweep cell calls ready_store
def _create_sqlite_store(uri: str) -> None:
    path = sqlite_file(uri).resolve()
    check_sqlite(uri, path)
    check_writable(uri, path)
    with open(store_lock(path), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)


def store_lock(path: Path) -> Path:
    """The lock file a SQLite store's tables are made under: one per store file, outside the project folder."""
    return Path(tempfile.gettempdir()) / f"stability-cookbook-store-{hashlib.sha1(str(path.resolve()).encode()).hexdigest()[:16]}.lock"


class MlflowTracker(Hook):
    """One MLflow run per training; resumes the run an `mlflow run` created (MLFLOW_RUN_ID).

    Every write after the start goes through a StoreWriter: training never waits on the store, an outage
    loses nothing, and the run's status is set only after everything before it is stored.
    """

    def __init__(self, cfg: Config, data_md5: dict[str, str], experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, system_metrics: bool = True, extra_tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, base: Config | None = None, flush_timeout: float | None = None,
                 log_model: bool = True):
        """base: the config file as written (default: cfg itself, i.e. no overrides); log_model: the trained network
        as an MLflow LoggedModel (off for sweeps that do not need thousands of them)."""
        self.cfg, self.data_md5, self.experiment = cfg, data_md5, experiment
        self.overrides = overridden_keys(cfg, base or cfg)
        check_tracking()  # a database store away (building its client connects) is one line before any run, not a traceback
        ready_store()  # before the client: building it opens the store
        self.run_name = run_name or f"{cfg.name}-s{cfg.seed}"
        self.system_metrics, self.extra_tags, self.parent_run_id = system_metrics, extra_tags or {}, parent_run_id
        self.flush_timeout = FLUSH_TIMEOUT if flush_timeout is None else flush_timeout  # read now: a test may shorten it
        self.uri, self.log_model = mlflow.get_tracking_uri(), log_model
        self.client = MlflowClient(self.uri)
        self.run_id: str | None = None
        self.steps_logged = 0  # training steps whose metrics were handed over (what an interrupted run kept)
        self.final_values: list = []  # the last epoch's [key, value, timestamp, step] values, linked to the model
        self.sampler = None

    def __enter__(self) -> MlflowTracker:
        try:
            self.run_id = self._start_run()
            mark_training(self.client, self.run_id)
            self._log_identity()
        except BaseException as e:  # nothing trained yet: the run it made ends here, never left RUNNING
            if self.run_id:
                with contextlib.suppress(Exception):
                    self.client.set_terminated(self.run_id, "KILLED" if isinstance(e, KeyboardInterrupt) else "FAILED")
            if isinstance(e, (MlflowException, OSError)):  # the store (or its artifact store) is away or refuses us
                raise StoreUnusable(f"tracking store {self.uri} cannot start the run ({first_line(e)})") from None
            raise
        self.writer = StoreWriter(self.client, self.run_id)
        if self.system_metrics:  # best effort: it drops samples while the store is away
            self.sampler = start_sampler(self.run_id, self.uri)
        return self

    def _log_identity(self) -> None:
        """Params, tags, the resolved config and the datasets: what the run is, written before it trains."""
        commit, dirty = git_state()
        tags = {
            CONFIG_TAG: self.cfg.name, SEED_TAG: str(self.cfg.seed), OVERRIDES_TAG: ",".join(self.overrides),
            "git_commit": commit, "git_dirty": str(dirty).lower(), **whereabouts(self.run_id),
            TORCH_TAG: torch.__version__, THREADS_TAG: str(torch.get_num_threads()),
            MLFLOW_RUN_NAME: self.run_name, **{f"data_md5.{k}": v for k, v in self.data_md5.items()}, **self.extra_tags,
        }
        if self.cfg.description:
            tags[MLFLOW_RUN_NOTE] = self.cfg.description
        params = [Param(k, v) for k, v in to_params(self.cfg).items()]
        self.client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        self.client.log_text(self.run_id, to_yaml(self.cfg), CONFIG_ARTIFACT)
        self.client.log_inputs(self.run_id, datasets=dataset_inputs(self.cfg, self.data_md5))

    def _start_run(self) -> str:
        """The `mlflow run` project run if there is one (and no parent), else a new run made by the client, so that
        several trackers (the members of a stacked run) can be open at once and MLflow's exit hook never ends ours."""
        if os.environ.get("MLFLOW_RUN_ID") and not self.parent_run_id:
            return os.environ["MLFLOW_RUN_ID"]
        experiment_id = mlflow.set_experiment(self.experiment).experiment_id
        tags = {PROCESS_TAG: process_id(), **({MLFLOW_PARENT_RUN_ID: self.parent_run_id} if self.parent_run_id else {})}
        return self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id

    def __exit__(self, exc_type, exc, tb) -> None:
        # A signal while we wait on the store (Ctrl-C at a hung end) stops the waiting, not the clean-up: what the
        # store has not taken is spooled, then the signal goes on. Only the first signal raises (stop._raise).
        interrupt = None
        try:
            if self.sampler:
                stop_sampler(self.sampler)
        except KeyboardInterrupt as e:
            interrupt = e
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        if status != "FINISHED":  # on_end did not run: say how far it got (and what stopped it: `mlflow run` makes KILLED FAILED)
            self.set_tags({STEPS_RUN_TAG: self.steps_logged, **({STOPPED_BY_TAG: stopped_by(exc)[0]} if status == "KILLED" else {})})
        self.writer.end(status)
        try:
            stored = interrupt is None and self.flush(0 if self.writer.fatal else None)
        except KeyboardInterrupt as e:
            stored, interrupt = False, e
        left = self.writer.close()
        try:
            if left and not stored:  # first: what follows may wait on the store, and a signal there must lose nothing
                self._spool(left, exc_type if interrupt is None else type(interrupt))
        finally:
            if self.writer.fatal:  # a status update may still fit where a batch did not: leave nothing RUNNING if it can
                at_most(STOP_TIMEOUT, lambda: self.client.set_terminated(self.run_id, "FAILED"), "end-failed-run")
        if interrupt is not None:
            raise interrupt

    def _spool(self, left: list, exc_type) -> None:
        """Keep what the store did not take in a spool file and say so in one line (an error unless one is on its way)."""
        writes = [op for op in left if op["op"] != "end"]
        values = sum(len(op.get("metrics", ())) for op in writes)
        path = spool_path(self.run_id)
        try:
            write_spool(path, self.uri, self.run_id, left, str(checkpoint_path(self.run_id).resolve()))  # train()'s, if any
            when = "once it takes writes again (space freed, permissions fixed)" if self.writer.fatal else "when the store is back"
            kept = f"{len(writes)} writes ({values} metric values) and the run's end are spooled in {path}; " \
                   f"`python -m cookbook sync` stores them {when}"
        except OSError as e:
            kept = f"{values} metric values are lost: the spool {path} could not be written ({e.strerror})"
        why = f"cannot take writes ({self.writer.fatal})" if self.writer.fatal else \
            f"unreachable ({self.writer.outage})" if self.writer.outage else "had not taken every write yet"
        ended = "ended" if exc_type is None else "stopped"  # ended: it trained to its end, only the store failed
        message = f"tracking store {self.uri} {why}: run {self.run_id} {ended} after {self.steps_logged} steps; {kept}"
        if exc_type is None or issubclass(exc_type, StoreFailure):
            raise StoreFailure(message)
        print(f"error: {message}", file=sys.stderr)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every write queued so far is stored (True) or `timeout` (default flush_timeout) passes (False)."""
        return self.writer.drain(self.flush_timeout if timeout is None else timeout)

    def check_store(self) -> None:
        """Stop training at the first write the store cannot take for good (disk full, read-only)."""
        if self.writer.fatal:
            raise StoreFailure(f"tracking store {self.uri} cannot take writes ({self.writer.fatal})")

    def set_tags(self, tags: dict[str, str]) -> None:
        self.writer.put({"op": "tags", "tags": {k: str(v) for k, v in tags.items()}})

    def on_start(self, info):
        """Tags of the training as set up: size, device (and which GPU), and the loop's own `tags` (e.g. determinism)."""
        gpu = gpu_label(info["device"])
        self.set_tags({PARAM_COUNT_TAG: info["param_count"], DEVICE_TAG: info["device"], TOTAL_STEPS_TAG: info["total_steps"],
                       **({GPU_TAG: gpu} if gpu else {}), **info.get("tags", {})})

    # Rows are queued before the store is checked: a store that cannot take them any more spools them at the end.
    def on_metrics(self, rows):
        self.steps_logged = max([self.steps_logged] + [step + 1 for step, m in rows if STEP_LOSS in m])
        self.writer.put(*metrics_op(rows))
        self.check_store()

    def on_epoch_end(self, epoch, metrics):
        ops = metrics_op([(epoch, metrics)])
        self.final_values = ops[0]["metrics"]  # what the model, if logged, is linked to
        self.writer.put(*ops)
        self.check_store()

    def on_end(self, result):
        self.set_tags({DIVERGED_TAG: str(result.diverged).lower(), STEPS_RUN_TAG: result.steps_run,
                       **({DIVERGED_STEP_TAG: result.diverged_step} if result.diverged else {})})
        buf = io.StringIO()
        pd.DataFrame(result.snapshots, columns=SNAPSHOT_COLUMNS).to_csv(buf, index=False)
        self.writer.put({"op": "text", "text": buf.getvalue(), "path": SNAPSHOT_ARTIFACT})
        if self.log_model and result.model is not None:
            self.writer.put({"op": "model", "path": str(save_model(result.model, self.run_id)), "step": result.steps_run,
                             "metrics": self.final_values, "datasets": dataset_ids(dataset_inputs(self.cfg, self.data_md5))})

