"""A store outage at a trial's end: the run's end is spooled and the trial given back; its retry stores the spool and
takes the run (a sweep cell and a stress point), never training the point twice nor losing it."""
import logging
import os
import signal
import subprocess
import sys

import mlflow
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import DATA_DIR, WITH_ROOT
from cookbook import delivery, tracking
from cookbook.checkpoint import checkpoint_path
from cookbook.delivery import spool_path
from cookbook.errors import StoreFailure
from experiments import stress, sweep
from experiments.grid import make_cells
from experiments.queue import enqueue_missing, open_study
from experiments.workers import QuietOnStop

SETTINGS = {"epochs": 1, "train_subset": 256, "test_subset": 100, "batch_size": 32, "data_dir": str(DATA_DIR)}


def store_away_at_the_end(monkeypatch):
    """The store takes every write but the run's end (an outage as the run ends); its end waits 0.5 s, not 60."""
    real = delivery.send

    def send(client, run_id, op):
        if op["op"] == "end":
            raise ConnectionError("store away")
        return real(client, run_id, op)
    monkeypatch.setattr(delivery, "send", send)
    monkeypatch.setattr(tracking, "FLUSH_TIMEOUT", 0.5)


def check_taken_not_trained(study, work, monkeypatch):
    """The outage: the trial fails, its run RUNNING with its end spooled, its point queued again; the store back, the
    retry stores the spool and takes the run (one FINISHED run, no spool, no checkpoint left), training nothing."""
    with monkeypatch.context() as outage:
        store_away_at_the_end(outage)
        with pytest.raises(StoreFailure, match="ended after 8 steps"):
            work()
    failed, retry = study.trials
    run_id = failed.user_attrs["mlflow_run_id"]
    assert (failed.state, retry.state, retry.system_attrs["fixed_params"]) == (TrialState.FAIL, TrialState.WAITING, failed.params)
    assert MlflowClient().get_run(run_id).info.status == "RUNNING" and spool_path(run_id).is_file()
    with monkeypatch.context() as untrained:
        untrained.setattr(stress, "train", lambda *a, **k: pytest.fail("trained a point whose run had ended"))
        untrained.setattr(sweep, "train", lambda *a, **k: pytest.fail("trained a cell whose run had ended"))
        work()
    failed, retry = study.trials
    assert retry.state == TrialState.COMPLETE and retry.user_attrs["mlflow_run_id"] == run_id
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["trial"] == str(retry.number)
    assert len(MlflowClient().search_runs([run.info.experiment_id])) == 1
    assert not spool_path(run_id).exists() and not checkpoint_path(run_id).exists()


def test_a_stress_point_whose_run_end_was_spooled_is_queued_again_and_taken_once_stored(mnist_dir, tracking, tmp_path,
                                                                                       monkeypatch):
    """The point was lost (the trial failed, nothing queued it again), and a retry would have trained it twice."""
    storage = str(tmp_path / "j.log")
    study = stress.open_stress_study(storage, "no_tricks", {"config": "no_tricks", "seeds": [0], "settings": SETTINGS,
                                                            "factor": 10, "converge_ratio": 0.5})  # x100 out of range: one point queued
    check_taken_not_trained(study, lambda: stress.work(storage, study.study_name, 1, "outage"), monkeypatch)


def test_a_sweep_cell_whose_run_end_was_spooled_is_taken_once_stored(mnist_dir, tracking, tmp_path, monkeypatch):
    """The cell was trained again, and `sync` later made its first run FINISHED too: two runs of one cell."""
    storage = str(tmp_path / "j.log")
    study = open_study(storage, "outage", make_cells("no_tricks", "0", ""), SETTINGS, "none")
    enqueue_missing(study)
    check_taken_not_trained(study, lambda: sweep.work(storage, "outage", "outage"), monkeypatch)


def test_optuna_says_nothing_of_a_trial_the_store_failed():
    """The worker says it in one line (the spool and the `sync` to run); Optuna added its warning and a traceback."""
    quiet = QuietOnStop()
    failed = logging.LogRecord("optuna", logging.WARNING, __file__, 1, "Trial 0 failed", None,
                               (StoreFailure, StoreFailure("store away"), None))
    after = logging.LogRecord("optuna", logging.WARNING, __file__, 1, "Trial 0 failed with value None.", None, None)
    assert not quiet.filter(failed) and not quiet.filter(after)
    assert QuietOnStop().filter(logging.LogRecord("optuna", logging.WARNING, __file__, 1, "a warning", None, sys.exc_info()))


def test_sync_ends_killed_the_parent_run_of_a_coordinator_that_died(tracking, tmp_path):
    """A coordinator killed (or stopped by the store) left its parent run RUNNING, and `sync` called it "made by an older
    version" and left it so."""
    code = ("import mlflow, os, signal; from experiments.workers import parent_run\n"
            "with parent_run(mlflow.start_run(run_name='sweep')): os.kill(os.getpid(), signal.SIGKILL)")
    env = {**os.environ, **WITH_ROOT}
    assert subprocess.run([sys.executable, "-c", code], env=env, cwd=tmp_path).returncode == -signal.SIGKILL
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("Default").experiment_id])
    assert run.info.status == "RUNNING"
    sync = subprocess.run([sys.executable, "-m", "cookbook", "sync"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert sync.returncode == 0, sync.stderr[-2000:]
    assert f"run {run.info.run_id}: its process is gone; ended KILLED" in sync.stdout
    assert MlflowClient().get_run(run.info.run_id).info.status == "KILLED"
