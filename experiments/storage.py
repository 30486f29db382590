"""Optuna storages for sweeps: a journal file by default (many processes, one machine), any RDB URL for many machines."""
from __future__ import annotations

import copy
import datetime
import warnings
from pathlib import Path

import optuna
from mlflow import MlflowClient
from optuna.storages import JournalStorage, RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend
from optuna.trial import FrozenTrial, TrialState

from cookbook.config import ConfigError
from cookbook.files import blocking_file
from cookbook.resume import recorded_run
from cookbook.stop import gone, process_id

DEFAULT_STORAGE = "optuna/journal.log"  # the embedded default, in the project folder
RDB_SCHEMES = ("postgresql", "mysql", "sqlite")
HEARTBEAT_SECONDS, GRACE_SECONDS = 5, 20  # RDB: a worker silent for GRACE_SECONDS is dead
RETRIES = 3
# MLflow tags on a study's runs: the sweep or stress study, the Optuna trial number, the sweep cell's key
SWEEP_TAG, STRESS_TAG, TRIAL_TAG, CELL_TAG = "sweep", "stress", "trial", "cell"
OWNER_ATTR, OWNER_TRIAL_ATTR = "worker", "worker_trial"  # trial attrs: the process running it, and for which trial
RUN_ID_ATTR, QUEUED_CELL_ATTR = "mlflow_run_id", "queued_cell"  # trial attrs: its MLflow run, the sweep cell it was queued as
PARENT_RUN_ATTR = "mlflow_parent_run_id"  # study attr: the MLflow run its cells' runs are nested under


class SweepError(ValueError):
    """Bad sweep input (grid, storage); raised before any work starts."""


def requeue(study: optuna.Study, trial: FrozenTrial) -> None:
    """A failed (killed) cell: close its MLflow run as KILLED and enqueue the cell again (at most RETRIES times)."""
    client, run_id = MlflowClient(), trial.user_attrs.get(RUN_ID_ATTR)
    if run_status(client, run_id) == "RUNNING":  # None: its run is in another store (the sweep moved), nothing to close
        client.set_terminated(run_id, "KILLED")
    retried = copy.deepcopy(trial)
    retried.user_attrs = queued_as(trial)  # Optuna's retry copies every attr: a killed trial's outcome (pruned_at_epoch...) too
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        RetryHeartbeatStaleTrialCallback(max_retry=RETRIES)(study, retried)  # named for heartbeats; requeues any failed trial


def queued_as(trial: FrozenTrial) -> dict:
    """The attrs that say what a trial is to train (a sweep cell's queue key), none of what it did: its retry's own."""
    return {QUEUED_CELL_ATTR: trial.user_attrs[QUEUED_CELL_ATTR]} if QUEUED_CELL_ATTR in trial.user_attrs else {}


def open_storage(spec: str) -> optuna.storages.BaseStorage:
    """A journal file path (default) or an RDB URL with heartbeats; one-line SweepError if unusable."""
    if "://" not in spec:
        path = Path(spec)
        if (blocker := blocking_file(path.parent)) is not None:
            raise SweepError(f"storage '{spec}': {blocker} is a file, not a folder; give a journal file path or an RDB URL")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path)))
        except OSError as e:  # a folder, a file where a folder should be, no permission
            raise SweepError(f"storage '{spec}' cannot be a journal file here ({e.strerror}); give a file path or an "
                             "RDB URL") from None
    scheme = spec.split("://", 1)[0].split("+", 1)[0]
    if scheme == "sqlite" and spec.split("://", 1)[1].lstrip("/") in ("", ":memory:"):
        raise SweepError(f"storage '{spec}' is in memory: its workers could not see it; give a file, e.g. sqlite:///optuna.db")
    if scheme not in RDB_SCHEMES:
        raise SweepError(f"storage '{spec}': unknown scheme '{scheme}'; use a journal file path or one of: "
                         f"{', '.join(s + '://' for s in RDB_SCHEMES)}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # heartbeats are "experimental"
            return RDBStorage(spec, heartbeat_interval=HEARTBEAT_SECONDS, grace_period=GRACE_SECONDS,
                              heartbeat_stale_trial_callback=requeue, engine_kwargs={"pool_pre_ping": True})
    except Exception as e:  # sqlalchemy raises many types for bad hosts, credentials, drivers
        raise SweepError(f"storage '{spec}' is unreachable or invalid: {str(e).splitlines()[0]}") from None


def load_existing(spec: str, name: str, marker: str, kind: str) -> optuna.Study:
    """The stored study `name`, if it is a `kind` (it has the study attr `marker`); else a one-line SweepError, and a
    journal file or SQLite database that does not exist is not made."""
    if "://" not in spec and not Path(spec).is_file():
        raise SweepError(f"no study '{name}' in storage '{spec}' (no such journal file)")
    if spec.startswith("sqlite:///") and not Path(spec.split(":///", 1)[1]).is_file():
        raise SweepError(f"no study '{name}' in storage '{spec}' (no such database file)")
    try:
        study = optuna.load_study(study_name=name, storage=open_storage(spec))
    except KeyError:
        raise SweepError(f"no study '{name}' in storage '{spec}'") from None
    if marker not in study.user_attrs:
        raise SweepError(f"study '{name}' in storage '{spec}' is not a {kind}")
    return study


def stamp_owner(trial: optuna.Trial) -> None:
    """Mark the trial as this process's, with its number (retries queued by earlier versions carry their original's owner)."""
    trial.set_user_attr(OWNER_ATTR, process_id())
    trial.set_user_attr(OWNER_TRIAL_ATTR, trial.number)


def owner(trial: FrozenTrial) -> str | None:
    """The process (host:pid) running the trial; None while none has claimed it (what a retry carries is not its own)."""
    return trial.user_attrs.get(OWNER_ATTR) if trial.user_attrs.get(OWNER_TRIAL_ATTR) == trial.number else None


def recover_dead_workers(study: optuna.Study) -> int:
    """Fail and requeue RUNNING trials whose worker process on this host is gone, or that no worker claimed within
    GRACE_SECONDS of starting (one stopped inside Optuna's ask(), before it could); return how many.

    The journal storage has no heartbeat, but all its workers share one machine, so a dead
    worker is exactly a pid that no longer exists.
    """
    recovered, now = 0, datetime.datetime.now()  # Optuna's datetime_start is naive local time
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        who = owner(trial)
        unclaimed = who is None and (now - trial.datetime_start).total_seconds() > GRACE_SECONDS
        if not (unclaimed or (who is not None and gone(who))):
            continue
        failed = fail_running(study, trial)
        if failed:
            requeue(study, failed)
            recovered += 1
    return recovered


# Optuna's private API, used only here (written against optuna==5.0.0, pinned in requirements.txt;
# tests/test_storage.py fails if an upgrade moves or changes any of it).
def heartbeat(study: optuna.Study, trial: optuna.Trial):
    """A context that sends the trial's heartbeats on RDB storages (what study.optimize does; ask/tell has none)."""
    from optuna.storages._heartbeat import get_heartbeat_thread

    return get_heartbeat_thread(trial._trial_id, study._storage)


def fail_running(study: optuna.Study, trial: FrozenTrial) -> FrozenTrial | None:
    """Mark another process's RUNNING trial FAIL (tell() only takes this process's trials); the failed trial, or
    None if some other process failed or finished it first."""
    try:
        won = study._storage.set_trial_state_values(trial._trial_id, TrialState.FAIL)
    except RuntimeError:  # UpdateFinishedTrialError: it was finished meanwhile
        return None
    return study._storage.get_trial(trial._trial_id) if won else None


UNRECORDED_ATTR = "unrecorded_trials"  # study attr: numbers of COMPLETE trials whose MLflow run is not in the store
PRUNED_ATTR = "pruned_at_epoch"  # trial attr: the pruner stopped it there (a result, unlike a duplicate the queue prunes)


def finished_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that ran to their result: COMPLETE, or PRUNED by the pruner (not a duplicate the queue pruned)."""
    return [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
            if t.state == TrialState.COMPLETE or PRUNED_ATTR in t.user_attrs]


def recorded_trials(study: optuna.Study) -> list[FrozenTrial]:
    """Trials that count as done: finished, and their MLflow run was FINISHED in the store when last checked."""
    unrecorded = set(study.user_attrs.get(UNRECORDED_ATTR, []))
    return [t for t in finished_trials(study) if t.number not in unrecorded]


def run_status(client: MlflowClient, run_id: str | None) -> str | None:
    """The run's status in this store, None if the store has no such run, or only a deleted one (the UI's delete: the
    analysis no longer sees it, so its cell is to be trained again)."""
    try:
        run = recorded_run(client, run_id) if run_id else None
    except ConfigError:
        return None
    return run.info.status if run and run.info.lifecycle_stage != "deleted" else None


def check_records(study: optuna.Study) -> int:
    """Mark done trials whose MLflow run is missing or not FINISHED in the current store as not done (and those whose
    run is there again as done); return how many cells that leaves without a done trial.

    The queue (Optuna) and the record (MLflow) are separate stores: a sweep rerun against another or a lost
    MLflow store would otherwise find every cell done and train nothing.
    """
    client, before = MlflowClient(), study.user_attrs.get(UNRECORDED_ATTR, [])
    done = finished_trials(study)  # every one: a store left and come back to has their runs again
    lost = [t.number for t in done if run_status(client, t.user_attrs.get(RUN_ID_ATTR)) != "FINISHED"]
    if lost != before:
        study.set_user_attr(UNRECORDED_ATTR, lost)
    recorded = {t.params["cell"] for t in done if t.number not in lost}
    return len({t.params["cell"] for t in done} - recorded)


def give_back(study: optuna.Study) -> int:
    """Queue again what this worker was running when it was stopped (its trials failed): same params; return how many."""
    mine = [t for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)) if owner(t) == process_id()]
    for trial in mine:  # a sweep cell keeps its queue key; a stress trial its (LR, seed) point
        # stopped before it suggested them, a trial's params are only those it was queued with
        study.enqueue_trial({**trial.system_attrs.get("fixed_params", {}), **trial.params}, user_attrs=queued_as(trial))
    return len(mine)
