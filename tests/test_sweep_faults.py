"""The sweep's queue (Optuna) and record (MLflow) agree: a rerun against another store retrains, SIGTERM gives cells back."""
import os
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import DATA_DIR, WITH_ROOT, created_store
from cookbook.stop import Terminated
from experiments.grid import cell_key, make_cells
from experiments.queue import claim, enqueue_missing, open_study, take_cell
from experiments.storage import give_back, open_storage, stamp_owner
from experiments.sweep import main
from experiments.sweep_summary import summary

TINY = ["--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64", "--data-dir", str(DATA_DIR)]


def finished_cell_runs(uri: str) -> list[str]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("stability-cookbook")
    runs = client.search_runs([exp.experiment_id], "attributes.status = 'FINISHED'") if exp else []
    return sorted(r.data.tags["cell"] for r in runs if "cell" in r.data.tags)


def test_rerun_against_another_store_trains_the_cells_it_lacks(mnist_dir, tracking, tmp_path, monkeypatch, capsys):
    storage = str(tmp_path / "journal.log")
    argv = ["run", "--configs", "no_tricks,batchnorm", "--seeds", "0", "--storage", storage, "--study", "two", *TINY]
    assert main(argv) == 0
    first = finished_cell_runs(tracking)
    assert first == ["batchnorm seed=0", "no_tricks seed=0"]
    other = f"sqlite:///{tmp_path}/other.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", other)
    mlflow.set_tracking_uri(other)
    assert main(argv) == 0
    assert f"[sweep] 2 done cells have no FINISHED run in {other}: queued again" in capsys.readouterr().err
    assert finished_cell_runs(other) == first  # the new store holds every cell
    assert finished_cell_runs(tracking) == first  # and the old one is as it was
    assert main(argv) == 0  # a third run finds both stores agreeing: nothing trained
    assert finished_cell_runs(other) == first and len(optuna.load_study(study_name="two", storage=open_storage(storage)).trials) == 4
    monkeypatch.setenv("MLFLOW_TRACKING_URI", tracking)
    mlflow.set_tracking_uri(tracking)
    capsys.readouterr()
    assert main(argv) == 0  # back to the first store: its runs are there, nothing trained
    assert "queued again" not in capsys.readouterr().err and finished_cell_runs(tracking) == first
    assert len(optuna.load_study(study_name="two", storage=open_storage(storage)).trials) == 4


def test_a_cell_whose_run_was_deleted_is_trained_again(mnist_dir, tracking, tmp_path, capsys):
    argv = ["run", "--configs", "no_tricks", "--seeds", "0", "--storage", str(tmp_path / "journal.log"), *TINY]
    assert main(argv) == 0
    client = MlflowClient()
    [run] = [r for r in client.search_runs([client.get_experiment_by_name("stability-cookbook").experiment_id]) if "cell" in r.data.tags]
    client.delete_run(run.info.run_id)  # the UI's delete: the analysis no longer sees the cell
    assert main(argv) == 0
    assert f"[sweep] 1 done cells have no FINISHED run in {tracking}: queued again" in capsys.readouterr().err
    assert finished_cell_runs(tracking) == ["no_tricks seed=0"]  # a new run: search_runs leaves deleted ones out
    client.restore_run(run.info.run_id)  # and restored: both of the cell's trials have a FINISHED run again
    assert main(argv) == 0
    storage = open_storage(str(tmp_path / "journal.log"))
    table = summary(optuna.load_study(study_name=optuna.get_all_study_names(storage)[0], storage=storage))
    assert len(table) == 1 and table.mlflow_run_id[0] != run.info.run_id  # the cell once, as the analysis reads it: the latest


def test_a_coordinator_stopped_while_it_summarises_ends_its_parent_run_killed(mnist_dir, tracking, tmp_path, monkeypatch):
    """SIGTERM after the workers finished, while the summary is drawn: the parent run ends KILLED, not FAILED."""
    from experiments import sweep

    def stopped(study):
        raise Terminated()
    monkeypatch.setattr(sweep, "summary", stopped)
    assert main(["run", "--configs", "no_tricks", "--seeds", "0", "--storage", str(tmp_path / "journal.log"), *TINY]) == 143
    client = MlflowClient()
    [parent] = client.search_runs([client.get_experiment_by_name("stability-cookbook").experiment_id], "tags.cells != ''")
    assert parent.info.status == "KILLED"


def small_sweep(tmp_path, name: str) -> optuna.Study:
    """A sweep's study of 4 queued cells, nothing trained."""
    from experiments import sweep
    args = sweep.build_parser().parse_args(["run", *TINY])
    study = open_study(str(tmp_path / "journal.log"), name, make_cells("no_tricks,batchnorm", "0,1", ""),
                       sweep.train_settings(args), "none")
    enqueue_missing(study)
    return study


def test_a_cell_stopped_before_its_worker_read_it_is_given_back_as_that_cell(tmp_path):
    """SIGTERM between claiming a trial and suggesting its cell: its params are still empty, its cell is in what it was
    queued with. Queued again without it, the sampler would draw any cell and the stopped one would never run."""
    study = small_sweep(tmp_path, "early")
    trial = study.ask()
    stamp_owner(trial)
    study.tell(trial, state=TrialState.FAIL)  # what Optuna does with a trial stopped by Ctrl-C
    assert give_back(study) == 1
    stopped = study.trials[0].user_attrs["queued_cell"]
    for _ in range(4):  # the 3 cells queued after it, then it again
        again = study.ask()
    cells = {cell_key(c): c for c in study.user_attrs["cells"]}
    assert again.number == 4 and take_cell(again) == cells[stopped]
    other = next(k for k in cells if k != stopped)
    study.enqueue_trial({"cell": other}, user_attrs={"queued_cell": stopped})  # a cell that is not its queue key
    with pytest.raises(optuna.TrialPruned, match=f"drew '{other}', not its queued cell '{stopped}'"):
        take_cell(study.ask())


@pytest.mark.parametrize("first", ["earlier", "later"])
def test_two_copies_of_a_cell_taken_at_the_same_instant_train_it_once(tmp_path, first):
    """A cell enqueued twice, both copies asked by two workers before either reads its cell: the earlier trial trains
    it and the later one is pruned as its duplicate, whichever checks first (each used to prune the other)."""
    study = small_sweep(tmp_path, f"twice-{first}")
    key = study.trials[0].user_attrs["queued_cell"]
    study.enqueue_trial({"cell": key}, user_attrs={"queued_cell": key})  # trial 4: the second copy
    earlier = study.ask()
    for _ in range(3):  # the other cells, out of the way
        study.tell(study.ask(), state=TrialState.FAIL)
    later = study.ask()
    assert (earlier.number, later.number) == (0, 4) and later.user_attrs["queued_cell"] == key
    outcomes = {}
    for trial in ([earlier, later] if first == "earlier" else [later, earlier]):
        try:
            outcomes[trial.number] = cell_key(take_cell(trial))
        except optuna.TrialPruned as pruning:
            outcomes[trial.number] = str(pruning)
    assert outcomes == {0: key, 4: f"duplicate of a finished or running '{key}'"}


def test_a_worker_stopped_while_claiming_fails_every_trial_it_asked(tmp_path, monkeypatch):
    """A stacked worker stopped between two ask()s: no claimed trial stays RUNNING (on another machine nothing would
    recover it), each fails and is given back."""
    from experiments import queue
    study = small_sweep(tmp_path, "claiming")
    calls = []

    def stopped_on_the_second(trial):
        calls.append(trial.number)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return take_cell(trial)

    monkeypatch.setattr(queue, "take_cell", stopped_on_the_second)
    with pytest.raises(KeyboardInterrupt):
        queue.claim(study, 4)
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 2 + [TrialState.WAITING] * 2


LONG = ["--epochs", "3000", "--train-subset", "256", "--test-subset", "100", "--batch-size", "32", "--data-dir", str(DATA_DIR)]


def wait_for_training(storage: str, name: str, client: MlflowClient, proc: subprocess.Popen) -> str:
    """The MLflow run of the first running cell, once it has stored 40 steps; else fail with the sweep's stderr."""
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
        try:
            running = optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials(states=(TrialState.RUNNING,))
        except KeyError:  # the coordinator has not made the study yet
            continue
        run_id = running[0].user_attrs.get("mlflow_run_id") if running else None
        if run_id and len(client.get_metric_history(run_id, "train/loss")) >= 40:
            return run_id
    proc.kill()
    raise AssertionError(f"no cell trained 40 steps in 300 s (sweep exit {proc.wait()}): {proc.stderr.read()[-3000:]}")


def assert_given_back(storage: str, name: str, client: MlflowClient, run_id: str) -> None:
    """The cell's trial failed and the same cell is queued again; its run ended KILLED with every step it trained."""
    trials = optuna.load_study(study_name=name, storage=open_storage(storage)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].user_attrs["queued_cell"] == trials[0].user_attrs["queued_cell"] == "no_tricks seed=0"
    run = client.get_run(run_id)
    stored = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert run.info.status == "KILLED" and stored == list(range(int(run.data.tags["steps_run"]))) and len(stored) >= 40


@pytest.mark.slow
@pytest.mark.parametrize("role", ["worker", "coordinator"])
def test_sigterm_ends_runs_killed_and_gives_the_cell_back(mnist_dir, tracking, tmp_path, role):
    storage, env = str(tmp_path / "journal.log"), {**os.environ, **WITH_ROOT}
    sweep, client = [sys.executable, "-m", "experiments.sweep"], MlflowClient(created_store(tracking))
    if role == "worker":  # a worker alone on a queue made here
        long = {"epochs": 3000, "train_subset": 256, "test_subset": 100, "batch_size": 32, "data_dir": str(DATA_DIR)}
        enqueue_missing(open_study(storage, "long", make_cells("no_tricks", "0", ""), long))
        proc = subprocess.Popen([*sweep, "work", "--study", "long", "--storage", storage], env=env, stderr=subprocess.PIPE, text=True)
    else:  # `timeout` or a scheduler stopping the whole sweep: the coordinator stops its worker
        proc = subprocess.Popen([*sweep, "run", "--configs", "no_tricks", "--study", "long", "--storage", storage, *LONG],
                                env=env, stderr=subprocess.PIPE, text=True)
    run_id = wait_for_training(storage, "long", client, proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == ("stopped by SIGTERM; running cells ended KILLED and went back to the queue: "
                                            "the same command resumes")
    assert "Traceback" not in err and "failed with" not in err  # Optuna's 55 lines on the trial the signal failed
    assert_given_back(storage, "long", client, run_id)
    if role == "coordinator":
        parent = client.get_run(client.get_run(run_id).data.tags["mlflow.parentRunId"])
        assert parent.info.status == "KILLED"


def finished_cell_run(study: optuna.Study, cell: str, tags: dict | None = None) -> str:
    """A FINISHED run of the cell in experiment 'adopt', as a worker stopped before it told Optuna leaves it."""
    from mlflow.entities import Metric
    client = MlflowClient()
    experiment = client.get_experiment_by_name("adopt") or client.get_experiment(client.create_experiment("adopt"))
    run_id = client.create_run(experiment.experiment_id, tags={"sweep": study.study_name, "cell": cell, "diverged": "false",
                                                               "steps_run": "8", "total_steps": "8", **(tags or {})}).info.run_id
    client.log_batch(run_id, metrics=[Metric("epoch/train_loss", 0.5, 0, 1), Metric("test/acc", 0.9, 0, 1)])
    client.set_terminated(run_id, "FINISHED")
    return run_id


def killed_after_its_run(study: optuna.Study, tags: dict | None = None) -> str:
    """The next queued cell's trial, its worker killed after the cell's run ended FINISHED and before tell(): failed and
    queued again, as the coordinator does."""
    from experiments.storage import requeue
    trial = study.ask()
    run_id = finished_cell_run(study, trial.user_attrs["queued_cell"], {"trial": str(trial.number), **(tags or {})})
    trial.set_user_attr("mlflow_run_id", run_id)
    study.tell(trial, state=TrialState.FAIL)
    requeue(study, study.trials[trial.number])
    return run_id


def test_a_cell_whose_run_finished_before_optuna_heard_is_not_trained_again(tracking, tmp_path, monkeypatch):
    """The retried trial takes the run its killed trial left, in a stacked worker too; a run the pruner stopped makes its
    trial PRUNED at the epoch it stopped after. A FINISHED run of the same cell that no failed trial of this study names
    (another study of the same name, in another storage) is not taken."""
    from cookbook.train import TrainResult
    from experiments import sweep
    study = small_sweep(tmp_path, "told")
    cells = [t.user_attrs["queued_cell"] for t in study.trials]
    plain, pruned = killed_after_its_run(study), killed_after_its_run(study, {"pruned": "true", "steps_run": "4"})
    killed_after_its_run(study, {"pruned": "true"})
    finished_cell_run(study, cells[3], {"trial": "3"})  # same sweep name and cell, made from another storage's study
    trained = []
    monkeypatch.setattr(sweep, "train_group", lambda members, *a: trained.extend(cell_key(m.cell) for m in members) or
                        [TrainResult(8, 8, final={"epoch/train_loss": 1.0}) for _ in members])
    sweep.run_stacked(study, claim(study, 2), "adopt", None)  # cells[3] and the retry of cells[0]
    assert trained == [cells[3]] and study.trials[4].value == 0.5 and study.trials[4].user_attrs["mlflow_run_id"] == plain
    assert study.trials[4].user_attrs["test/acc"] == 0.9 and study.trials[4].intermediate_values == {1: 0.5}
    monkeypatch.setattr(sweep, "train", lambda *a, **k: pytest.fail("trained a cell that has its result"))
    study.optimize(lambda t: sweep.objective(t, "adopt", None), n_trials=2)
    assert [t.state for t in study.trials[5:]] == [TrialState.PRUNED] * 2 and study.trials[5].user_attrs["mlflow_run_id"] == pruned
    assert study.trials[5].user_attrs["pruned_at_epoch"] == 1 and study.trials[5].user_attrs["steps_run"] == 4
    tags = {r.info.run_id: r.data.tags["trial"] for r in MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name("adopt").experiment_id])}
    assert tags[plain] == "4" and tags[pruned] == "5" and len(tags) == 4  # retagged as the trial that holds it; none made


def test_a_stopped_stacked_worker_fails_every_cell_it_claimed_not_only_the_group_training(mnist_dir, tracking, tmp_path,
                                                                                          monkeypatch):
    """Claimed cells of groups waiting their turn must not stay RUNNING (nothing would give them back)."""
    from experiments import sweep
    args = sweep.build_parser().parse_args(["run", *TINY])
    cells = make_cells("no_tricks,batchnorm", "0,1", "")
    study = open_study(str(tmp_path / "journal.log"), "stopped", cells, sweep.train_settings(args), "none")
    enqueue_missing(study)

    def stopped(*args):
        raise KeyboardInterrupt  # SIGTERM while the first group trains

    monkeypatch.setattr(sweep, "train_stacked", stopped)
    with pytest.raises(KeyboardInterrupt):
        sweep.run_stacked(study, claim(study, 4), "stopped", None)  # two groups of two seeds
    assert [t.state for t in study.trials] == [TrialState.FAIL] * 4


def test_a_cell_resumes_only_the_unfinished_run_its_own_failed_trial_left(tracking, tmp_path, monkeypatch):
    """Found by the sweep's name and the cell's tags, a same-named sweep's KILLED run (another storage, same experiment)
    was resumed as this cell's; a deleted one is trained afresh."""
    from experiments import resume_cells
    from experiments.storage import requeue
    monkeypatch.setattr(resume_cells, "resumable", lambda client, run_id: (client.get_run(run_id), None))  # all have a checkpoint
    study, client = open_study(str(tmp_path / "journal.log"), "resumes", make_cells("no_tricks", "0", ""), {}), MlflowClient()
    enqueue_missing(study)  # one cell: each ask() below takes it, or its retry
    cell, experiment = study.trials[0].user_attrs["queued_cell"], client.create_experiment("cells")
    killed = lambda: client.create_run(experiment, tags={"sweep": study.study_name, "cell": cell}).info.run_id  # noqa: E731
    own, deleted, foreign = killed(), killed(), killed()  # the foreign run the latest
    for run_id in (foreign, own, deleted):
        client.set_terminated(run_id, "KILLED")
    for run_id in (own, deleted):  # two tries of the cell, the later one's run deleted in the UI
        trial = study.ask()
        trial.set_user_attr("mlflow_run_id", run_id)
        study.tell(trial, state=TrialState.FAIL)
        requeue(study, study.trials[trial.number])
    client.delete_run(deleted)
    assert resume_cells.stopped_run(study.ask(), cell) == own
