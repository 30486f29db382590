"""The divergence-boundary study on a tiny slice: probes, pruning of diverged trials, report, MLflow runs."""
import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import DATA_DIR
from experiments.storage import open_storage
from experiments.stress import main, report

TINY = ["--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--batch-size", "32", "--data-dir", str(DATA_DIR)]


@pytest.mark.parametrize("argv,message", [
    (["--configs", "nope"], "unknown config 'nope' in configs"),
    (["--n-trials", "3"], "need n_trials >= 2 x seeds (4)"),
    (["--factor", "10"], "factor > 100"),
    (["--converge-ratio", "1.5"], "0 < converge_ratio < 1"),
    (["--storage", "redis://x"], "unknown scheme 'redis'"),
])
def test_bad_input_is_one_line_before_any_work(argv, message, tracking, tmp_path, capsys):
    storage = tmp_path / "journal.log"
    assert main(["run", "--storage", str(storage), *TINY, *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err
    assert not storage.exists() and mlflow.get_experiment_by_name("stability-cookbook") is None


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
    assert result["trials"] == 4 and result["steps_run"] < result["steps_without_pruning"]
    assert result["smallest_failed_lr"] <= 0.1 and result["x100"][0]["diverged"]
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("stability-cookbook").experiment_id])
    assert len([r for r in runs if "stress" in r.data.tags]) == 4
