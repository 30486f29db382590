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
