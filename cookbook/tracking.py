"""MLflow tracking as a training hook: params, tags, batched async metrics, artifacts."""
from __future__ import annotations

import fcntl
import functools
import hashlib
import io
import os
import subprocess
import tempfile
import time
from pathlib import Path

import mlflow
import pandas as pd
import torch
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from .config import Config, overridden_keys, to_params, to_yaml
from .hooks import Hook, Rows

DEFAULT_EXPERIMENT = "stability-cookbook"
SNAPSHOT_ARTIFACT = "grad_norms/snapshots.csv"
SNAPSHOT_COLUMNS = ["step", "param", "numel", "grad_norm", "weight_norm"]
CONFIG_ARTIFACT = "config.yaml"
# Tags analysis reads (it imports these names; nobody retypes them).
CONFIG_TAG, SEED_TAG, DIVERGED_TAG, DIVERGED_STEP_TAG = "config", "seed", "diverged", "diverged_step"
PARAM_COUNT_TAG, STEPS_RUN_TAG, TOTAL_STEPS_TAG = "param_count", "steps_run", "total_steps"
OVERRIDES_TAG = "overrides"  # comma list of the config keys the run sets differently from its config file; "" = none
REPO = Path(__file__).resolve().parent.parent


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
    """Create a SQLite store's tables once, under a lock: processes starting together on a fresh store would
    otherwise race in MLflow's schema migrations ("duplicate column name: step"; 7 of 8 crashed here)."""
    uri = uri or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):  # server and database stores are set up by whoever runs them
        _create_sqlite_store(uri)


@functools.cache  # once per store and process: every tracker and sweep cell calls ready_store
def _create_sqlite_store(uri: str) -> None:
    path = Path(uri.removeprefix("sqlite:///").split("?")[0]).resolve()
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:16]  # one lock per store file, outside the project folder
    with open(Path(tempfile.gettempdir()) / f"stability-cookbook-store-{digest}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        MlflowClient(uri).search_experiments(max_results=1)


def _metrics(rows: Rows) -> list[Metric]:
    now = int(time.time() * 1000)
    return [Metric(key, float(value), now, step) for step, values in rows for key, value in values.items()]


class MlflowTracker(Hook):
    """One MLflow run per training; resumes the run an `mlflow run` created (MLFLOW_RUN_ID)."""

    def __init__(self, cfg: Config, data_md5: dict[str, str], experiment: str = DEFAULT_EXPERIMENT,
                 run_name: str | None = None, system_metrics: bool = True, extra_tags: dict[str, str] | None = None,
                 parent_run_id: str | None = None, base: Config | None = None):
        """base: the config file as written (default: cfg itself, i.e. no overrides)."""
        self.cfg, self.data_md5, self.experiment = cfg, data_md5, experiment
        self.overrides = overridden_keys(cfg, base or cfg)
        ready_store()  # before the client: building it opens the store
        self.run_name = run_name or f"{cfg.name}-s{cfg.seed}"
        self.system_metrics, self.extra_tags, self.parent_run_id = system_metrics, extra_tags or {}, parent_run_id
        self.client = MlflowClient()
        self.run_id: str | None = None
        self.steps_logged = 0  # training steps whose metrics were handed to MLflow (what an interrupted run kept)
        self.pending = []  # async RunOperations to wait for

    def __enter__(self) -> MlflowTracker:
        self.run_id = self._start_run()
        commit, dirty = git_state()
        tags = {
            CONFIG_TAG: self.cfg.name, SEED_TAG: str(self.cfg.seed), OVERRIDES_TAG: ",".join(self.overrides),
            "git_commit": commit, "git_dirty": str(dirty).lower(),
            "torch_version": torch.__version__, "torch_threads": str(torch.get_num_threads()),
            "mlflow.runName": self.run_name, **{f"data_md5.{k}": v for k, v in self.data_md5.items()}, **self.extra_tags,
        }
        if self.cfg.description:
            tags["mlflow.note.content"] = self.cfg.description
        params = [Param(k, v) for k, v in to_params(self.cfg).items()]
        self.client.log_batch(self.run_id, params=params, tags=[RunTag(k, v) for k, v in tags.items()], synchronous=True)
        self.client.log_text(self.run_id, to_yaml(self.cfg), CONFIG_ARTIFACT)
        return self

    def _start_run(self) -> str:
        """The fluent run where it is needed (resuming `mlflow run`'s run, system metrics), else a client-made run,
        so that several trackers (the members of a stacked run) can be open at once."""
        self.fluent = bool(os.environ.get("MLFLOW_RUN_ID")) or self.system_metrics
        if not os.environ.get("MLFLOW_RUN_ID"):  # inside `mlflow run` the project run already has its experiment
            experiment_id = mlflow.set_experiment(self.experiment).experiment_id
        if self.fluent:
            return mlflow.start_run(run_name=self.run_name, log_system_metrics=self.system_metrics,
                                    parent_run_id=self.parent_run_id, nested=self.parent_run_id is not None).info.run_id
        tags = {"mlflow.parentRunId": self.parent_run_id} if self.parent_run_id else {}
        return self.client.create_run(experiment_id, run_name=self.run_name, tags=tags).info.run_id

    def __exit__(self, exc_type, exc, tb) -> None:
        self.flush()
        status = "FINISHED" if exc_type is None else "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
        if status == "KILLED":
            self.set_tags({STEPS_RUN_TAG: self.steps_logged})
        if self.fluent:
            mlflow.end_run(status=status)
        else:
            self.client.set_terminated(self.run_id, status)

    def flush(self) -> None:
        """Wait until every async metric batch is stored."""
        for op in self.pending:
            op.wait()
        self.pending = []

    def set_tags(self, tags: dict[str, str]) -> None:
        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()], synchronous=True)

    def on_start(self, info):
        self.set_tags({PARAM_COUNT_TAG: info["param_count"], "device": info["device"], TOTAL_STEPS_TAG: info["total_steps"]})

    def on_metrics(self, rows):
        self.steps_logged = max([self.steps_logged] + [step + 1 for step, m in rows if "train/loss" in m])
        metrics = _metrics(rows)
        for i in range(0, len(metrics), 1000):  # log_batch accepts at most 1000 metrics per call
            self.pending.append(self.client.log_batch(self.run_id, metrics=metrics[i : i + 1000], synchronous=False))

    def on_epoch_end(self, epoch, metrics):
        self.on_metrics([(epoch, metrics)])

    def on_end(self, result):
        self.set_tags({DIVERGED_TAG: str(result.diverged).lower(), STEPS_RUN_TAG: result.steps_run,
                       **({DIVERGED_STEP_TAG: result.diverged_step} if result.diverged else {})})
        buf = io.StringIO()
        pd.DataFrame(result.snapshots, columns=SNAPSHOT_COLUMNS).to_csv(buf, index=False)
        self.client.log_text(self.run_id, buf.getvalue(), SNAPSHOT_ARTIFACT)
