"""The Optuna private API behind experiments/storage.py still works on the pinned Optuna (fails on an upgrade that moves it)."""
import optuna
from optuna.trial import TrialState

from experiments.storage import fail_running, heartbeat, open_storage


def test_fail_running_fails_another_process_trial_once(tmp_path):
    study = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
    trial = study.ask()
    frozen = study.get_trials(states=(TrialState.RUNNING,))[0]
    failed = fail_running(study, frozen)
    assert failed is not None and failed.number == trial.number and failed.state == TrialState.FAIL
    assert fail_running(study, frozen) is None  # already failed: somebody else won


def test_heartbeat_is_sent_on_rdb_storages_only(tmp_path):
    rdb = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/optuna.db"))
    trial = rdb.ask()
    beating = heartbeat(rdb, trial)
    assert type(beating).__name__ == "HeartbeatThread"
    with beating:
        pass
    assert optuna.storages.fail_stale_trials(rdb) is None and rdb.trials[0].state == TrialState.RUNNING  # beat recently
    journal = optuna.create_study(storage=open_storage(str(tmp_path / "journal.log")))
    assert type(heartbeat(journal, journal.ask())).__name__ == "NullHeartbeatThread"
