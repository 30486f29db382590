"""The Optuna private API behind experiments/storage.py still works on the pinned Optuna (fails on an upgrade that moves it)."""
import socket
import subprocess
import sys
import time

import optuna
from optuna.trial import TrialState

from cookbook.stop import start_time
from experiments.storage import fail_running, heartbeat, open_storage


def test_fail_running_fails_another_process_trial_once(tmp_path):
    study = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
    trial = study.ask()
    frozen = study.get_trials(states=(TrialState.RUNNING,))[0]
    failed = fail_running(study, frozen)
    assert failed is not None and failed.number == trial.number and failed.state == TrialState.FAIL
    assert fail_running(study, frozen) is None  # already failed: somebody else won


def test_heartbeat_is_sent_on_rdb_storages_only(tmp_path):
    """A trial that beat and then went silent past the grace period is failed as stale; one that never beat is not (Optuna
    cannot tell it from a trial of a study without heartbeats), so a heartbeat() that sent nothing fails this test."""
    storage = optuna.storages.RDBStorage(f"sqlite:///{tmp_path}/optuna.db", heartbeat_interval=1, grace_period=1)
    rdb = optuna.create_study(storage=storage)
    beat, silent = rdb.ask(), rdb.ask()
    beating = heartbeat(rdb, beat)
    assert type(beating).__name__ == "HeartbeatThread"
    with beating:
        time.sleep(0.3)
    time.sleep(2.5)  # past the 1 s grace, and past the 1 s the store's CURRENT_TIMESTAMP (SQLite) may round "now" down by
    optuna.storages.fail_stale_trials(rdb)
    assert [t.state for t in rdb.trials] == [TrialState.FAIL, TrialState.RUNNING]
    assert type(heartbeat(rdb, silent)).__name__ == "HeartbeatThread"  # open_storage's RDB storages have heartbeats
    assert open_storage(f"sqlite:///{tmp_path}/optuna.db").get_heartbeat_interval() is not None
    journal = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
    assert type(heartbeat(journal, journal.ask())).__name__ == "NullHeartbeatThread"


def test_requeue_of_a_cell_whose_run_is_in_another_store_queues_it_again(tracking, tmp_path):
    """Its run cannot be closed here (the sweep moved to another MLflow store): the cell is queued all the same."""
    from mlflow import MlflowClient

    from experiments.storage import requeue
    study = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
    trial = study.ask({"lr": optuna.distributions.FloatDistribution(1e-4, 1.0)})
    trial.set_user_attr("mlflow_run_id", "0" * 32)
    study.tell(trial, state=TrialState.FAIL)
    requeue(study, study.trials[0])
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    running = MlflowClient().create_run(MlflowClient().create_experiment("here")).info.run_id
    trial = study.ask()
    trial.set_user_attr("mlflow_run_id", running)
    study.tell(trial, state=TrialState.FAIL)
    requeue(study, study.trials[-1])
    assert MlflowClient().get_run(running).info.status == "KILLED"  # a run in this store is closed


def dead_process() -> str:
    """host:pid of a process that has exited."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return f"{socket.gethostname()}:{proc.pid}"


def test_a_retry_is_not_failed_for_its_originals_dead_worker_and_an_unclaimed_trial_is_after_the_grace(tracking, tmp_path,
                                                                                                      monkeypatch):
    """A retry queued by an earlier version carries its failed original's owner: until its own worker stamps it, that
    owner's death is not its own.
    A trial no worker claimed (one stopped inside ask()) would stay RUNNING for ever: failed after the grace."""
    from experiments import storage
    study = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
    study.enqueue_trial({}, user_attrs={storage.OWNER_ATTR: dead_process(), storage.OWNER_TRIAL_ATTR: 7})  # a retry of 7
    study.ask()  # popped by a live worker that has not stamped it yet
    assert storage.recover_dead_workers(study) == 0 and study.trials[0].state == TrialState.RUNNING
    monkeypatch.setattr(storage, "GRACE_SECONDS", -1)
    assert storage.recover_dead_workers(study) == 1  # now it is past the grace, unclaimed: failed and queued again
    assert [t.state for t in study.trials] == [TrialState.FAIL, TrialState.WAITING]
    mine = study.ask()
    storage.stamp_owner(mine)
    assert storage.owner(study.trials[-1]) == storage.process_id()
    assert storage.recover_dead_workers(study) == 0  # claimed by a live process
    gone = study.ask()
    gone.set_user_attr(storage.OWNER_ATTR, dead_process())
    gone.set_user_attr(storage.OWNER_TRIAL_ATTR, gone.number)
    assert storage.recover_dead_workers(study) == 1 and study.trials[gone.number].state == TrialState.FAIL


def test_a_worker_whose_pid_another_process_holds_now_is_dead(tracking, tmp_path):
    """After a reboot or a container restart pids are handed out again: a stale RUNNING trial whose worker's pid a live
    process holds would look alive for ever (a rerun waited on it without end). Its start time says it is not that one."""
    from experiments import storage
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        study = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
        for start in (start_time(holder.pid), "12345"):  # the holder itself; an earlier process with its pid
            trial = study.ask()
            study._storage.set_trial_user_attr(trial._trial_id, storage.OWNER_ATTR, f"{socket.gethostname()}:{holder.pid}:{start}")
            study._storage.set_trial_user_attr(trial._trial_id, storage.OWNER_TRIAL_ATTR, trial.number)
        assert storage.recover_dead_workers(study) == 1
        assert [t.state for t in study.trials[:2]] == [TrialState.RUNNING, TrialState.FAIL]
    finally:
        holder.kill()
        holder.wait()


def test_a_retry_keeps_what_its_original_was_to_train_and_none_of_what_it_did(tracking, tmp_path):
    """A trial killed between the pruner's decision and tell() holds pruned_at_epoch: Optuna's retry copied it, and its
    retry, completed, was read as pruned (and kept the killed trial's run id and steps until it set its own)."""
    from experiments import storage
    study = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
    study.enqueue_trial({"cell": "a"}, user_attrs={storage.QUEUED_CELL_ATTR: "a"})
    cells = {"cell": optuna.distributions.CategoricalDistribution(["a", "b"])}
    killed = study.ask(cells)
    for name, value in {storage.PRUNED_ATTR: 2, "steps_run": 10, storage.RUN_ID_ATTR: "0" * 32}.items():
        killed.set_user_attr(name, value)
    study.tell(killed, state=TrialState.FAIL)
    storage.requeue(study, study.trials[0])
    retry = study.ask(cells)
    assert retry.params == {"cell": "a"} and retry.user_attrs == {storage.QUEUED_CELL_ATTR: "a"}
    assert optuna.storages.RetryFailedTrialCallback.retry_history(study.trials[1]) == [0]
    study.tell(retry, 0.5)
    assert [(t.number, storage.PRUNED_ATTR in t.user_attrs) for t in storage.finished_trials(study)] == [(1, False)]
