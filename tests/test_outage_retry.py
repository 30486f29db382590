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
from cookbook.checkpoint import checkpoint_path, save
from cookbook.delivery import spool_path
from cookbook.errors import StoreFailure
from cookbook.spooled import store_spool
from cookbook.tracking import MlflowTracker
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


def check_taken_not_trained(study, work, monkeypatch, cells=1):
    """The outage: each trial fails, its run RUNNING with its end spooled, its point queued again; the store back, each
    retry stores the spool and takes the run (one FINISHED run a cell, no spool, no checkpoint left), training nothing."""
    with monkeypatch.context() as outage:
        store_away_at_the_end(outage)
        with pytest.raises(StoreFailure, match="ended after 8 steps"):
            work()
    failed, retries = study.trials[:cells], study.trials[cells:]
    runs = [t.user_attrs["mlflow_run_id"] for t in failed]
    assert {t.state for t in failed} == {TrialState.FAIL} and {t.state for t in retries} == {TrialState.WAITING}
    assert [t.system_attrs["fixed_params"] for t in retries] == [t.params for t in failed]
    assert all(MlflowClient().get_run(r).info.status == "RUNNING" and spool_path(r).is_file() for r in runs)
    with monkeypatch.context() as untrained:
        for module, name in ((stress, "train"), (sweep, "train"), (sweep, "train_stacked")):
            untrained.setattr(module, name, lambda *a, **k: pytest.fail("trained a point whose run had ended"))
        work()
    retries = study.trials[cells:]
    assert {t.state for t in retries} == {TrialState.COMPLETE} and [t.user_attrs["mlflow_run_id"] for t in retries] == runs
    stored = [MlflowClient().get_run(r) for r in runs]
    assert [(r.info.status, r.data.tags["trial"]) for r in stored] == [("FINISHED", str(t.number)) for t in retries]
    assert len(MlflowClient().search_runs([stored[0].info.experiment_id])) == cells
    assert not any(spool_path(r).exists() or checkpoint_path(r).exists() for r in runs)


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


def test_the_runs_of_a_stacked_group_whose_ends_were_spooled_end_finished_and_are_taken(mnist_dir, tracking, tmp_path,
                                                                                         monkeypatch):
    """One member's failed end reached the others' as their exception: they ended FAILED, and were trained again."""
    storage = str(tmp_path / "j.log")
    study = open_study(storage, "stacked", make_cells("no_tricks", "0,1", ""), SETTINGS, "none")
    enqueue_missing(study)
    check_taken_not_trained(study, lambda: sweep.work(storage, "stacked", "outage", stack=2), monkeypatch, cells=2)


def test_sync_from_another_folder_deletes_the_checkpoint_of_a_run_it_ends_finished(tiny_cfg, tracking, tmp_path,
                                                                                    monkeypatch):
    """Its checkpoint stayed (1.1 MB a run): `sync --spool-dir` looked for it in the folder sync ran in."""
    with monkeypatch.context() as outage:
        store_away_at_the_end(outage)
        with pytest.raises(StoreFailure), MlflowTracker(tiny_cfg, {}, experiment="away", system_metrics=False) as tracker:
            save(checkpoint_path(tracker.run_id), {"epoch": 1})  # as train() leaves it after its last epoch
    checkpoint = checkpoint_path(tracker.run_id).resolve()
    assert checkpoint.is_file() and MlflowClient().get_run(tracker.run_id).info.status == "RUNNING"
    (tmp_path / "elsewhere").mkdir()
    sync = subprocess.run([sys.executable, "-m", "cookbook", "sync", "--spool-dir", str(tmp_path / "mlflow-spool")],
                          env={**os.environ, **WITH_ROOT}, cwd=tmp_path / "elsewhere", capture_output=True, text=True)
    assert sync.returncode == 0 and "run FINISHED" in sync.stdout, sync.stderr[-2000:]
    assert MlflowClient().get_run(tracker.run_id).info.status == "FINISHED" and not checkpoint.exists()


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
    closed = MlflowClient().get_run(run.info.run_id)
    assert closed.info.status == "KILLED" and "steps_run" not in closed.data.tags  # it trained nothing: no step count


def test_a_spool_another_replay_stored_meanwhile_is_no_error(tmp_path):
    """A sync by hand beside a sweep's retry: the second to come found the file gone (a traceback, or a failed trial)."""
    assert store_spool(tmp_path / "mlflow-spool" / "gone.jsonl")[:2] == (0, 0)
