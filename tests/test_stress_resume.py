"""A stress study rerun: a killed trial's finished run is taken by its retry, the same seeds in another order are the same
study, and a study whose runs the store lacks is refused."""
import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from test_stress import TINY

from conftest import DATA_DIR
from experiments import stress
from experiments.storage import open_storage
from experiments.stress import main
from experiments.stress_range import RANGE_ATTR, range_from_blowup


def test_a_trial_killed_after_its_run_ended_is_taken_by_its_retry_not_trained_again(mnist_dir, tracking, tmp_path, monkeypatch):
    """Killed between its run's end and tell(): the retry takes that run (retagged as its own) and records what training
    would have; the same point trained afresh gives the same record. No second run of the point."""
    from experiments.storage import requeue

    class Killed(Exception):
        pass

    settings = {"epochs": 1, "train_subset": 256, "test_subset": 100, "batch_size": 32, "data_dir": str(DATA_DIR)}
    study = stress.open_stress_study(str(tmp_path / "j.log"), "no_tricks", {"config": "no_tricks", "seeds": [0], "settings": settings,
                                                                            "factor": 1000, "converge_ratio": 0.5})
    run_trial = lambda: study.optimize(lambda t: stress.objective(t, "adopt", None), n_trials=1)  # noqa: E731
    with monkeypatch.context() as killed:
        killed.setattr(stress, "trial_outcome", lambda *a: (_ for _ in ()).throw(Killed()))
        with pytest.raises(Killed):
            run_trial()
    run_trial()  # the LR x100 probe, queued next
    requeue(study, study.trials[0])  # what the coordinator does for a dead worker's trial
    with monkeypatch.context() as untrained:
        untrained.setattr(stress, "train", lambda *a, **k: pytest.fail("trained a point whose run had finished"))
        run_trial()
    study.enqueue_trial(study.trials[0].params)
    run_trial()  # the same point, trained
    failed, _, retry, fresh = study.trials
    mine = lambda t: {k: v for k, v in t.user_attrs.items() if k not in ("mlflow_run_id", "worker", "worker_trial")}  # noqa: E731
    assert retry.user_attrs["mlflow_run_id"] == failed.user_attrs["mlflow_run_id"] != fresh.user_attrs["mlflow_run_id"]
    assert (retry.state, retry.value, retry.intermediate_values, mine(retry)) == (fresh.state, fresh.value, fresh.intermediate_values,
                                                                                 mine(fresh))
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("adopt").experiment_id])
    assert sorted(r.data.tags["trial"] for r in runs) == ["1", "2", "3"] and {r.info.status for r in runs} == {"FINISHED"}


def test_the_same_seeds_in_another_order_are_the_same_study_and_an_earlier_study_so_named_resumes(tracking, tmp_path, monkeypatch):
    """`--seeds 1,0` and `--seeds 0,1` made two studies (each point trained twice); a study named by the order given, as
    names were made before they sorted seeds, is resumed rather than started again."""
    monkeypatch.setattr(stress, "run_workers", lambda args, study: True)  # what is made, not what is trained
    monkeypatch.setattr("experiments.study_figures.log_stress_history", lambda *a: None)
    studies = lambda storage: optuna.get_all_study_names(open_storage(storage))  # noqa: E731
    run = lambda seeds, storage: main(["run", "--configs", "no_tricks", "--seeds", *seeds.split(), "--n-trials", "4",  # noqa: E731
                                       "--storage", storage, *TINY])
    for seeds in ("1,0", "0,1"):
        run(seeds, str(tmp_path / "a.log"))
    (name,) = studies(str(tmp_path / "a.log"))
    assert optuna.load_study(study_name=name, storage=open_storage(str(tmp_path / "a.log"))).user_attrs["seeds"] == [0, 1]
    args = stress.build_parser().parse_args(["run", *TINY])
    earlier = stress.open_stress_study(str(tmp_path / "b.log"), "no_tricks", {
        "config": "no_tricks", "seeds": [1, 0], "settings": stress.train_settings(args), "factor": args.factor,
        "converge_ratio": args.converge_ratio}).study_name
    run("1,0", str(tmp_path / "b.log"))
    assert studies(str(tmp_path / "b.log")) == [earlier]
    from types import SimpleNamespace  # with --range-from-lr-find the earlier study's range came from its first seed's test
    monkeypatch.setattr(stress, "run_range_test", lambda config, settings, seed, *a: (SimpleNamespace(blowup_lr=[None, 1.0][seed]), "r"))
    earlier = stress.open_stress_study(str(tmp_path / "c.log"), "no_tricks", {
        "config": "no_tricks", "seeds": [1, 0], "settings": stress.train_settings(args), "factor": args.factor,
        "converge_ratio": args.converge_ratio, RANGE_ATTR: list(range_from_blowup(1.0))}).study_name
    run("1,0 --range-from-lr-find", str(tmp_path / "c.log"))
    assert studies(str(tmp_path / "c.log")) == [earlier]


def test_a_study_whose_trial_runs_are_not_in_the_store_is_refused_in_one_line(tracking, tmp_path, monkeypatch, capsys):
    """Rerun against a new store (or with a trial's run deleted), it reported trials the store does not hold."""
    monkeypatch.setattr(stress, "run_workers", lambda args, study: True)
    monkeypatch.setattr("experiments.study_figures.log_stress_history", lambda *a: None)
    storage = str(tmp_path / "j.log")
    argv = ["run", "--configs", "no_tricks", "--seeds", "0", "--n-trials", "2", "--storage", storage, *TINY]
    assert main(argv) == 0
    (name,) = optuna.get_all_study_names(open_storage(storage))
    study, client = optuna.load_study(study_name=name, storage=open_storage(storage)), MlflowClient()
    run_id = client.create_run(client.create_experiment("trials")).info.run_id
    client.set_terminated(run_id, "FINISHED")
    trial = study.ask()
    for key, value in {"lr": 1e-3, "seed": 0, "diverged": False, "converged": True, "final_loss": 0.1, "steps_run": 8,
                       "total_steps": 8, "mlflow_run_id": run_id}.items():
        trial.set_user_attr(key, value)
    study.tell(trial, -3.0)
    assert main(argv) == 0  # its run is there
    client.delete_run(run_id)
    capsys.readouterr()
    trials = len(study.trials)
    assert main(argv) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: stress study '{name}' has 1 finished trials whose runs are not FINISHED in {tracking}; run it against "
        "the store it was made with (or restore the runs), or start it afresh with another --storage")
    assert len(study.trials) == trials
