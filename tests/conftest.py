"""Shared fixtures: real MNIST (built once, offline mirror if needed), a tiny config, a temporary MLflow store, fake GPUs."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import mlflow
import pytest
import torch

if not torch.cuda.is_available():  # cookbook.fused_conv's Triton kernels on CPU tensors: Triton reads this when first imported
    os.environ.setdefault("TRITON_INTERPRET", "1")

from cookbook.config import CONFIGS_DIR, Config, merge, validate  # noqa: F401  (CONFIGS_DIR: tests import it from here)
from cookbook.data import ensure_mnist, load_mnist
from cookbook.tracking import ready_store

ROOT = Path(__file__).resolve().parent.parent
DATA_DIR = ROOT / "data"
# For subprocesses run outside the project folder: ours first, then any path the caller had (a GPU host's installed wheels)
WITH_ROOT = {"PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}

# A few steps on a small slice of MNIST: every monitor path fires, nothing takes more than seconds.
TINY = {
    "epochs": 2,
    "data": {"data_dir": str(DATA_DIR), "batch_size": 32, "train_subset": 256, "test_subset": 200},
    "monitor": {"layer_every": 4, "snapshot_steps": [0, 5, 9], "flush_every": 3},
    "schedule": {"warmup_epochs": 0.5},
}
TINY_FLAGS = ["--epochs", "2", "--batch-size", "32", "--train-subset", "256", "--test-subset", "200",
              "--data-dir", str(DATA_DIR), "--set", "monitor.layer_every=4", "--set", "monitor.flush_every=3",
              "--set", "monitor.snapshot_steps=[0, 5, 9]", "--no-system-metrics"]


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    ensure_mnist(DATA_DIR)
    return DATA_DIR


@pytest.fixture(scope="session")
def tiny_data(mnist_dir):
    return load_mnist(mnist_dir, train_subset=256, test_subset=200)


@pytest.fixture
def float64(tiny_data):
    """tiny_data in float64, with float64 the default dtype meanwhile (exact comparisons of two computations)."""
    torch.set_default_dtype(torch.float64)
    yield dataclasses.replace(tiny_data, train_x=tiny_data.train_x.double(), test_x=tiny_data.test_x.double())
    torch.set_default_dtype(torch.float32)


@pytest.fixture
def tiny_cfg() -> Config:
    return validate(merge(Config(name="tiny"), TINY))


IN_PROJECT = ("mlflow.db", "mlruns", "checkpoints", "mlflow-spool", "optuna")  # what our commands make where they run


@pytest.fixture(autouse=True)
def nothing_lands_in_the_project_folder():
    """Tests write under their tmp_path: a store, artifacts, checkpoints, spools or a journal new in the project folder
    fail the test that made them."""
    before = {name for name in IN_PROJECT if (ROOT / name).exists()}
    yield
    made = {name for name in IN_PROJECT if (ROOT / name).exists()} - before
    assert not made, f"this test made {sorted(made)} in the project folder {ROOT}"


@pytest.fixture
def tracking(tmp_path, monkeypatch) -> str:
    """A fresh SQLite MLflow store for one test, run from tmp_path: the store's artifacts (./mlruns), checkpoints and
    spool files land there, not in the project folder."""
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    # MLflow keeps the last set_experiment's id in this module global, with no public reset: a fresh store must not
    # inherit another test's experiment (setattr fails loudly if an MLflow upgrade renames it)
    monkeypatch.setattr(mlflow.tracking.fluent, "_active_experiment_id", None)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    mlflow.set_tracking_uri(uri)
    yield uri
    if mlflow.active_run():
        mlflow.end_run()
    mlflow.set_tracking_uri(None)
    os.environ.pop("MLFLOW_EXPERIMENT_ID", None)  # mlflow.set_experiment exports it for child processes


def training_run(client, experiment: str) -> str:
    """A bare run that resume and reproduce take as a training (its config as params, as the tracker logs it)."""
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    client.log_param(run_id, "config.name", "tiny")
    return run_id


def only_run(experiment="stability-cookbook"):
    """The experiment's one run (a test that made one)."""
    runs = mlflow.MlflowClient().search_runs([mlflow.get_experiment_by_name(experiment).experiment_id])
    assert len(runs) == 1
    return runs[0]


def created_store(uri: str) -> str:
    """uri, its tables made under ready_store's lock: MlflowClient opens a store when built, outside that lock, so a
    test reading a store its subprocess is still creating raced MLflow's migrations (CircularDependencyError in CI)."""
    ready_store(uri)
    return uri


def training_victim(trials) -> object | None:
    """A RUNNING trial whose MLflow run is still RUNNING: killing its worker now interrupts training. (A trial whose run
    has just ended is still RUNNING in Optuna until it is told: a kill then leaves a FINISHED run, not a KILLED one.)"""
    from mlflow import MlflowClient

    candidates = [t for t in trials if "mlflow_run_id" in t.user_attrs]
    if not candidates:
        return None
    ready_store()  # MlflowClient opens the store when built: through the lock the processes creating it hold
    client = MlflowClient()
    return next((t for t in candidates if client.get_run(t.user_attrs["mlflow_run_id"]).info.status == "RUNNING"), None)


@pytest.fixture
def gpus(monkeypatch):
    """pretend(n, listed): n GPUs named 'Fake GPU i' with 80 GB free each (the last one current),
    CUDA_VISIBLE_DEVICES=listed (None: unset)."""
    def pretend(n: int, listed: str | None = None):
        monkeypatch.setattr(torch.cuda, "device_count", lambda: n)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda i: f"Fake GPU {i}")
        monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (80 * 10**9, 80 * 10**9))
        monkeypatch.setattr(torch.cuda, "current_device", lambda: n - 1)
        if listed is None:
            monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        else:
            monkeypatch.setenv("CUDA_VISIBLE_DEVICES", listed)
    return pretend
