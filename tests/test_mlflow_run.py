"""`mlflow run .` end to end, as a user types it (slow: a subprocess per run)."""
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import ROOT

pytestmark = pytest.mark.slow
MLFLOW = str(Path(sys.executable).with_name("mlflow"))


def mlflow_run(uri, *extra):
    here = Path(uri.removeprefix("sqlite:///")).parent  # the test's tmp_path: the project's commands run in its folder
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, "COOKBOOK_CHECKPOINT_DIR": str(here / "checkpoints"),
           "COOKBOOK_SPOOL_DIR": str(here / "spool")}
    for leaked in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        env.pop(leaked, None)
    cmd = [MLFLOW, "run", str(ROOT), "--experiment-name", "e2e", *extra]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)


def test_mlflow_run_local_env_tracks_one_finished_run(mnist_dir, tracking):
    done = mlflow_run(tracking, "--env-manager", "local", "-P", "config=all_tricks", "-P", "epochs=1",
                      "-P", "train_subset=300", "-P", "test_subset=200", "-P", f"data_dir={mnist_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.tags["mlflow.project.entryPoint"] == "main" and run.data.tags["config"] == "all_tricks"
    assert run.data.params["config.data.train_subset"] == "300" and run.data.params["config.optim.max_norm"] == "1.0"
    assert len(MlflowClient().get_metric_history(run.info.run_id, "train/loss")) == 3  # 300 images / 128
    assert run.info.run_id in done.stdout


def test_mlflow_run_bad_config_fails_with_one_line(tracking):
    done = mlflow_run(tracking, "--env-manager", "local", "-P", "config=nope")
    assert done.returncode != 0
    assert "error: unknown config 'nope'; available: all_tricks, batchnorm, layernorm, no_tricks" in done.stderr


def test_mlflow_run_without_flags_builds_its_virtualenv(mnist_dir, tracking):
    """The default env manager: a virtualenv from python_env.yaml (built once, ~2-3 min, then reused)."""
    done = mlflow_run(tracking, "-P", "config=batchnorm", "-P", "epochs=1", "-P", "train_subset=256",
                      "-P", "test_subset=200", "-P", f"data_dir={mnist_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    assert "/.mlflow/envs/" in done.stderr  # ran inside the project's virtualenv, not this interpreter
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("e2e").experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["config"] == "batchnorm"


def test_mlflow_run_sweep_entry_nests_cells_under_the_project_run(mnist_dir, tracking, tmp_path):
    done = mlflow_run(tracking, "--env-manager", "local", "-e", "sweep", "-P", "configs=no_tricks,batchnorm",
                      "-P", "lrs=1e-3,1e-2", "-P", "epochs=1", "-P", "train_subset=256", "-P", "test_subset=100",
                      "-P", "workers=2", "-P", f"storage={tmp_path}/journal.log", "-P", f"data_dir={mnist_dir}")
    assert done.returncode == 0, done.stderr[-3000:]
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("e2e").experiment_id])
    (parent,) = [r for r in runs if r.data.tags.get("mlflow.project.entryPoint") == "sweep"]
    cells = [r for r in runs if "cell" in r.data.tags]
    assert len(cells) == 4 and {r.data.tags["mlflow.parentRunId"] for r in cells} == {parent.info.run_id}
    assert {r.info.status for r in runs} == {"FINISHED"}
