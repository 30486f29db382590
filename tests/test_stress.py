"""The divergence-boundary study on a tiny slice: probes, pruning, range from an LR range test, report, figure, runs."""
import functools
import math
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

from analysis.load import stress_reports
from analysis.lr import survivors
from conftest import DATA_DIR, WITH_ROOT, training_victim
from cookbook.lr_find import START_LR, RangeTest, lr_range_test
from cookbook.range_run import LR_FIND_BLOWUP_TAG
from cookbook.stop import Terminated, pid_of
from experiments import stress, stress_range
from experiments.storage import PRUNED_ATTR, open_storage
from experiments.stress import main
from experiments.stress_range import RANGE_FACTOR, range_from_blowup, run_range_test, search_range
from experiments.stress_report import format_report, probe_outcome, report

TINY = ["--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--batch-size", "32", "--data-dir", str(DATA_DIR)]


@pytest.mark.parametrize("argv,message", [
    (["--configs", "nope"], "unknown config 'nope' in configs"),
    (["--n-trials", "3"], "need n_trials >= 2 x seeds (4)"),
    (["--factor", "10"], "factor > 100"),
    (["--factor", "nan"], "a finite factor > 100"),
    (["--factor", "inf"], "a finite factor > 100"),
    (["--converge-ratio", "1.5"], "0 < converge_ratio < 1"),
    (["--storage", "redis://x"], "unknown scheme 'redis'"),
    (["--pruner", "median"], "pruner='median'; choose one of none, threshold (a stress study maximises"),
    (["--seeds", "-1", "--n-trials", "4"], "seed=-1 must be in 0..2**64-1"),  # checked as each trial's config
    (["--seeds", "0,0", "--n-trials", "4"], "seeds='0,0' lists a seed more than once"),
    (["--data-dir", "/dev/null"], "cannot write MNIST under /dev/null"),  # not each worker's error, after the study
])
def test_bad_input_is_one_line_before_any_work(argv, message, tracking, tmp_path, capsys):
    storage = tmp_path / "journal.log"
    assert main(["run", "--storage", str(storage), *TINY, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not storage.exists() and mlflow.get_experiment_by_name("stability-cookbook") is None


def test_a_bad_tracking_store_is_one_line_before_the_journal_is_made(tracking, tmp_path, capsys):
    storage, store = tmp_path / "journal.log", mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("foo://bar")  # the journal was made, then MLflow raised (exit 1)
    try:
        assert main(["run", "--storage", str(storage), *TINY]) == 2
    finally:
        mlflow.set_tracking_uri(store)
    assert "error: tracking store foo://bar cannot be used" in capsys.readouterr().err and not storage.exists()


@pytest.mark.slow
def test_stress_prunes_diverged_trials_and_reports_a_boundary(mnist_dir, tracking, tmp_path):
    storage = str(tmp_path / "journal.log")
    assert main(["run", "--configs", "no_tricks", "--seeds", "0", "--n-trials", "4", "--converge-ratio", "0.95",
                 "--storage", storage, *TINY]) == 0
    (summary,) = optuna.get_all_study_summaries(open_storage(storage))
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage(storage))
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) == 4
    x100 = [t for t in trials if abs(t.user_attrs["lr"] - 0.1) < 1e-9]
    assert x100 and x100[0].state == TrialState.PRUNED and x100[0].user_attrs["diverged"]  # Adam at 0.1 blows up
    base = [t for t in trials if abs(t.user_attrs["lr"] - 1e-3) < 1e-12][0]
    assert base.state == TrialState.COMPLETE and base.user_attrs["steps_run"] == base.user_attrs["total_steps"]
    epochs = int(TINY[TINY.index("--epochs") + 1])
    assert sorted(base.intermediate_values) == list(range(1, epochs + 1))  # optuna-dashboard's intermediate values
    assert base.intermediate_values[epochs] == base.user_attrs["final_loss"]
    result = report(study)
    assert result["trials"] == 4 and result["steps_run"] < result["steps_without_pruning"] and result["study"] == study.study_name
    assert result["smallest_failed_lr"] <= 0.1 and result["x100"][0]["diverged"] and result["x100"][0][PRUNED_ATTR] is None
    assert result["x100"][0]["initial_loss"] == x100[0].user_attrs["initial_loss"] > 2  # the analysis' step-0 loss
    assert result["pruner"] == "none" and result["lr_range"] == pytest.approx([1e-3, 1.0])  # the defaults
    client = MlflowClient()
    runs = client.search_runs([mlflow.get_experiment_by_name("stability-cookbook").experiment_id])
    assert len([r for r in runs if "stress" in r.data.tags]) == 4
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert [a.path for a in client.list_artifacts(parent, "stress/no_tricks")] == ["stress/no_tricks/optimization_history.png"]


def test_the_range_from_a_range_test_is_centred_on_its_blow_up():
    lo, hi = range_from_blowup(0.1)
    assert (10**lo, 10**hi) == (pytest.approx(0.1 / RANGE_FACTOR), pytest.approx(0.1 * RANGE_FACTOR))
    assert range_from_blowup(2 * START_LR)[0] == pytest.approx(math.log10(START_LR))  # nothing below what the test saw
    assert search_range({"log10_lr_range": [-2.0, 1.0]}) == (-2.0, 1.0)
    assert search_range({"config": "no_tricks", "settings": {}, "factor": 1000}) == pytest.approx((-3.0, 0.0))


@pytest.mark.slow
def test_range_from_lr_find_runs_the_test_first_and_searches_around_its_blow_up(mnist_dir, tracking, tmp_path,
                                                                              monkeypatch):
    # On 256 images the loss blows up at LR 12-19 (by the CPU's kernels and thread count), just past the default end 10:
    # run the test on to 1000 so that it surely blows up here.
    monkeypatch.setattr(stress_range, "lr_range_test", functools.partial(lr_range_test, end=1e3))
    storage = str(tmp_path / "journal.log")
    assert main(["run", "--configs", "layernorm", "--seeds", "0", "--n-trials", "2", "--range-from-lr-find",
                 "--storage", storage, *TINY]) == 0
    (summary,) = optuna.get_all_study_summaries(open_storage(storage))
    study = optuna.load_study(study_name=summary.study_name, storage=open_storage(storage))
    client = MlflowClient()
    test = client.get_run(study.user_attrs["lr_find_run_id"])
    assert test.data.tags["lr_find"] == "layernorm" and test.info.status == "FINISHED"
    assert test.data.tags["mlflow.parentRunId"] == study.user_attrs["mlflow_parent_run_id"]  # nested under the stress run
    lo, hi = range_from_blowup(float(test.data.tags[LR_FIND_BLOWUP_TAG]))
    assert search_range(study.user_attrs) == pytest.approx((lo, hi))
    trials = study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))
    assert len(trials) == 2 and all(lo <= t.params["log10_lr"] <= hi for t in trials)
    result = report(study)
    assert result["lr_find_run_id"] == test.info.run_id and result["lr_range"] == pytest.approx([10**lo, 10**hi])
    tags = client.get_run(study.user_attrs["mlflow_parent_run_id"]).data.tags
    assert tags["stress.layernorm.lr_range"] == f"{10**lo:.3g},{10**hi:.3g}"


def test_inside_mlflow_run_the_range_test_gets_a_run_of_its_own(mnist_dir, tracking, monkeypatch):
    client = MlflowClient()
    project = client.create_run(client.create_experiment("project")).info.run_id  # `mlflow run`'s run: the stress parent
    monkeypatch.setenv("MLFLOW_RUN_ID", project)
    settings = {"train_subset": 256, "test_subset": 100, "batch_size": 32, "data_dir": str(DATA_DIR)}
    _, run_id = run_range_test("no_tricks", settings, 0, "project", project)
    assert run_id != project and os.environ["MLFLOW_RUN_ID"] == project
    assert client.get_run(project).info.status == "RUNNING" and client.get_run(run_id).info.status == "FINISHED"
    assert client.get_run(run_id).data.tags["mlflow.parentRunId"] == project


def test_a_range_test_that_never_blew_up_leaves_the_default_range(tracking, tmp_path, monkeypatch):
    monkeypatch.setattr(stress, "run_range_test", lambda *args: (RangeTest(), "its-run-id"))  # blowup_lr None
    args = stress.build_parser().parse_args(["run", "--range-from-lr-find", "--storage", str(tmp_path / "journal.log")])
    mlflow.set_experiment("never")
    with mlflow.start_run() as parent:
        study = stress.start_study(args, "no_tricks", [0], {}, parent.info)
    assert search_range(study.user_attrs) == pytest.approx((-3.0, 0.0)) and study.user_attrs["lr_find_run_id"] == "its-run-id"
    assert "from its LR: the LR range test never blew up" in format_report(report(study))


def test_a_trial_that_diverged_after_an_epoch_keeps_no_final_loss():
    from cookbook.train import TrainResult
    from experiments.stress import trial_outcome
    diverged = TrainResult(steps_run=20, total_steps=32, diverged=True, diverged_step=20, final={"epoch/train_loss": 0.5})
    assert trial_outcome(diverged, 2.3, 0.5) == {"diverged": True, "steps_run": 20, "initial_loss": 2.3, "final_loss": None,
                                                 "converged": False}
    done = TrainResult(steps_run=32, total_steps=32, final={"epoch/train_loss": 0.5})
    assert trial_outcome(done, 2.3, 0.5)["final_loss"] == 0.5 and trial_outcome(done, 2.3, 0.5)["converged"] is True


@pytest.mark.slow
def test_a_sigkilled_stress_worker_is_replaced_and_its_trial_ends_killed(mnist_dir, tracking, tmp_path):
    """One worker, killed mid-trial: the coordinator fails that trial (its run KILLED), runs another round to finish the
    budget and exits 0; nothing is left RUNNING."""
    storage = str(tmp_path / "journal.log")
    slow = ["--epochs", "2", "--train-subset", "1024", "--test-subset", "100", "--batch-size", "32", "--data-dir", str(DATA_DIR)]
    coordinator = subprocess.Popen([sys.executable, "-m", "experiments.stress", "run", "--configs", "no_tricks", "--seeds", "0",
                                    "--n-trials", "2", "--storage", storage, *slow], env={**os.environ, **WITH_ROOT})
    victim, deadline = None, time.time() + 300
    while victim is None and coordinator.poll() is None and time.time() < deadline:
        time.sleep(0.5)
        summaries = optuna.get_all_study_summaries(open_storage(storage)) if os.path.exists(storage) else []
        victim = training_victim(optuna.load_study(study_name=summaries[0].study_name, storage=open_storage(storage)).get_trials(
            states=(TrialState.RUNNING,))) if summaries else None
    assert victim is not None, f"no trial was training (coordinator exit {coordinator.poll()})"
    os.kill(pid_of(victim.user_attrs["worker"]), signal.SIGKILL)
    assert coordinator.wait(timeout=600) == 0
    study = optuna.load_study(study_name=summaries[0].study_name, storage=open_storage(storage))
    assert study.trials[victim.number].state == TrialState.FAIL
    assert len(study.get_trials(states=(TrialState.COMPLETE, TrialState.PRUNED))) == 2
    assert not study.get_trials(states=(TrialState.RUNNING,))
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("stability-cookbook").experiment_id])
    assert MlflowClient().get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"
    assert sorted(r.info.status for r in runs) == ["FINISHED"] * (len(runs) - 1) + ["KILLED"]


def test_each_worker_samples_its_own_points(tmp_path, monkeypatch):
    """Workers seeded alike drew the same random (LR, seed) pairs while TPE starts up, and trained each twice."""
    from optuna.distributions import FloatDistribution

    from experiments.workers import WORKER_INDEX_ENV
    storage = str(tmp_path / "journal.log")
    name = stress.open_stress_study(storage, "no_tricks", {"config": "no_tricks", "seeds": [0], "settings": {},
                                                           "factor": 1000, "converge_ratio": 0.5}).study_name
    draws = []
    for index in ("0", "1", "0"):
        monkeypatch.setenv(WORKER_INDEX_ENV, index)
        study = stress.open_stress_study(storage, config="", name=name)
        draws.append(study.sampler.sample_independent(study, None, "log10_lr", FloatDistribution(-3, 0)))
    assert draws[0] != draws[1] and draws[0] == draws[2]
    study.enqueue_trial({"log10_lr": -2.0, "seed": 0})  # a later round: worker 0 must not draw its first points again
    again = stress.open_stress_study(storage, config="", name=name)
    assert again.sampler.sample_independent(again, None, "log10_lr", FloatDistribution(-3, 0)) != draws[0]


def test_a_budget_left_unspent_ends_the_stress_run_failed_and_the_command_1(tracking, tmp_path, monkeypatch, capsys):
    """Workers that kept failing leave a report of fewer trials than asked: not a result the analysis may read."""
    monkeypatch.setattr(stress, "run_workers", lambda args, study: False)  # every round's workers died
    assert main(["run", "--configs", "no_tricks", "--seeds", "0", "--n-trials", "2", "--storage", str(tmp_path / "j.log"),
                 *TINY]) == 1
    assert capsys.readouterr().err.strip().splitlines()[-1] == ("error: no_tricks: workers failed before 2 trials "
                                                                "finished; the same command resumes")
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("stability-cookbook").experiment_id])
    assert run.info.status == "FAILED" and stress_reports("stability-cookbook") == []


def test_a_coordinator_stopped_while_it_reports_ends_its_stress_run_killed(tracking, tmp_path, monkeypatch):
    """SIGTERM after the workers, while the boundary is drawn: the stress run ends KILLED, not FAILED (nor FINISHED)."""
    monkeypatch.setattr(stress, "run_workers", lambda args, study: True)

    def stopped(*args):
        raise Terminated()
    monkeypatch.setattr("experiments.study_figures.log_stress_history", stopped)
    assert main(["run", "--configs", "no_tricks", "--seeds", "0", "--n-trials", "2", "--storage", str(tmp_path / "j.log"),
                 *TINY]) == 143
    (run,) = MlflowClient().search_runs([mlflow.get_experiment_by_name("stability-cookbook").experiment_id])
    assert run.info.status == "KILLED"


def test_workers_share_the_trial_budget_without_overshooting_it(tmp_path):
    """Two finished trials and another worker's running one: a worker whose trial ends with 4 of n_trials=4 counted stops,
    where counting finished trials only it started one more (6 of 5 with two workers)."""
    study = optuna.create_study(storage=open_storage(str(tmp_path / "j.log")), study_name="budget")
    for value in (1.0, 2.0):
        study.tell(study.ask(), value)
    other = study.ask()  # another worker's trial, running
    study.optimize(lambda t: 0.0, n_trials=10, callbacks=[stress.budget(4)])
    assert len(study.trials) == 4 and study.trials[other.number].state == TrialState.RUNNING


def test_an_x100_probe_the_pruner_stopped_is_no_verdict():
    """A probe stopped by the pruner read "did not converge" (its attr was not kept), and its config "fails in every seed"."""
    import pandas as pd
    stopped = {"seed": 0, "converged": False, "diverged": False, "diverged_step": None, "final_loss": None, PRUNED_ATTR: 1}
    finished = {**stopped, PRUNED_ATTR: None, "converged": True, "final_loss": 0.1}
    assert probe_outcome(stopped) == "stopped by the pruner after epoch 1 (not a finished training)"
    assert probe_outcome({k: v for k, v in stopped.items() if k != PRUNED_ATTR}) == "did not converge"  # an older report
    table = pd.DataFrame({"config": ["a", "b", "b"], "outcome": [probe_outcome(stopped), probe_outcome(finished),
                                                                probe_outcome(stopped)]})
    assert survivors(table) == "**Survive LR x100:** b (1/1 seeds). Stopped by the pruner in every seed (no verdict): a."
