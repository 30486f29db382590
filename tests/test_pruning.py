"""Pruners: the per-epoch hook stops a trial cleanly (run FINISHED and tagged, trial PRUNED), choices, stored pruners."""
import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import DATA_DIR
from cookbook.checkpoint import checkpoint_path
from cookbook.hooks import Recorder
from cookbook.tracking import MlflowTracker
from cookbook.train import train
from experiments.grid import make_cells
from experiments.pruning import (
    PRUNED_TAG,
    STRESS_PRUNER,
    SWEEP_PRUNER,
    ReportToOptuna,
    check_pruner,
    make_pruner,
    prunable,
)
from experiments.queue import open_study
from experiments.storage import PRUNED_ATTR, SweepError, open_storage, recorded_trials
from experiments.sweep import main

TINY = ["--epochs", "2", "--train-subset", "256", "--test-subset", "100", "--batch-size", "32", "--data-dir", str(DATA_DIR)]


def prune_everything() -> optuna.Study:
    """A study whose pruner stops every trial at its first report (every loss is above 0)."""
    return optuna.create_study(pruner=optuna.pruners.ThresholdPruner(upper=0.0))


def test_a_pruned_trial_stops_after_the_epoch_and_its_run_ends_finished_and_tagged(tiny_cfg, tiny_data, tracking):
    study = prune_everything()
    trial = study.ask()
    tracker = MlflowTracker(tiny_cfg, tiny_data.md5, experiment="prune", log_model=False, system_metrics=False)
    with pytest.raises(optuna.TrialPruned, match="pruned after epoch 1 .step 8."):
        with prunable(tracker):
            train(tiny_cfg, tiny_data, [tracker, ReportToOptuna(trial)])
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "FINISHED"
    assert (run.data.tags[PRUNED_TAG], run.data.tags["steps_run"], run.data.tags["diverged"]) == ("true", "8", "false")
    assert len(client.get_metric_history(tracker.run_id, "train/loss")) == 8  # 256 images / batch 32: one epoch, no more
    assert [m.step for m in client.get_metric_history(tracker.run_id, "epoch/train_loss")] == [1]
    attrs = study.trials[0].user_attrs
    assert (attrs[PRUNED_ATTR], attrs["steps_run"], attrs["total_steps"]) == (1, 8, 16)
    assert list(study.trials[0].intermediate_values) == [1]


def test_no_pruner_and_the_last_epoch_never_stop_a_trial(tiny_cfg, tiny_data):
    quiet = optuna.create_study(pruner=make_pruner("none"))
    result = train(tiny_cfg, tiny_data, [ReportToOptuna(trial := quiet.ask())])
    assert result.steps_run == 16 and sorted(trial.study.trials[0].intermediate_values) == [1, 2]
    tiny_cfg.epochs = 1  # the last epoch has nothing left to save: even a pruner that stops everything lets it finish
    assert train(tiny_cfg, tiny_data, [ReportToOptuna(prune_everything().ask())]).steps_run == 8


def test_the_divergence_step_is_reported_to_the_trial(tiny_cfg, tiny_data):
    tiny_cfg.optim.lr = 1e3  # Adam at LR 1000 blows up in the first steps
    study = optuna.create_study()
    result = train(tiny_cfg, tiny_data, [Recorder(), ReportToOptuna(study.ask())])
    assert result.diverged and study.trials[0].user_attrs["diverged_step"] == result.diverged_step


def test_pruner_names_are_checked_in_one_line():
    assert check_pruner("", SWEEP_PRUNER) == check_pruner("", STRESS_PRUNER, ranking=False) == "none"
    assert check_pruner("threshold", STRESS_PRUNER, ranking=False) == "threshold"
    with pytest.raises(SweepError, match=r"^pruner='nope'; choose one of none, median, hyperband, threshold$"):
        check_pruner("nope", SWEEP_PRUNER)
    with pytest.raises(SweepError, match=r"^pruner='median'; choose one of none, threshold \(a stress study maximises"):
        check_pruner("median", STRESS_PRUNER, ranking=False)
    with pytest.raises(SweepError, match=r"^pruner='median' with stack=2: a stacked model trains its seeds together"):
        check_pruner("median", SWEEP_PRUNER, stack=2)
    assert isinstance(make_pruner("threshold"), optuna.pruners.ThresholdPruner)
    assert isinstance(make_pruner("hyperband"), optuna.pruners.HyperbandPruner)


def test_a_loaded_study_gets_the_pruner_it_was_made_with(tmp_path):
    storage = str(tmp_path / "journal.log")
    cells = make_cells("no_tricks", "0", "")
    assert isinstance(open_study(storage, "median", cells, {}, "median").pruner, optuna.pruners.MedianPruner)
    assert isinstance(open_study(storage, "median").pruner, optuna.pruners.MedianPruner)  # how workers load it
    optuna.create_study(study_name="old", storage=open_storage(storage)).set_user_attr("cells", cells)
    assert isinstance(open_study(storage, "old").pruner, optuna.pruners.NopPruner)  # not Optuna's default MedianPruner
    with pytest.raises(SweepError, match="pruner='none': study 'median' was made with pruner='median'"):
        open_study(storage, "median", cells, {}, "none")


def test_bad_pruner_is_one_line_before_any_work(tracking, tmp_path, capsys):
    storage = tmp_path / "journal.log"
    assert main(["run", "--configs", "no_tricks", "--pruner", "nope", "--storage", str(storage), *TINY]) == 2
    assert main(["run", "--configs", "no_tricks", "--pruner", "median", "--stack", "2", "--storage", str(storage), *TINY]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert [e.split(":")[0] for e in errors] == ["error"] * 2 and "choose one of none, median" in errors[0]
    assert not storage.exists() and mlflow.get_experiment_by_name("stability-cookbook") is None


@pytest.mark.slow
def test_a_median_pruned_sweep_cell_is_a_finished_result(mnist_dir, tracking, tmp_path, capsys):
    """Five cells at small LRs, then one at LR 3e-3 whose first epoch is worse than their median: it stops there."""
    storage = str(tmp_path / "journal.log")
    argv = ["run", "--configs", "no_tricks", "--seeds", "0", "--lrs", "1e-4,2e-4,3e-4,5e-4,7e-4,3e-3", "--pruner", "median",
            "--storage", storage, "--study", "median", *TINY]
    assert main(argv) == 0  # every cell counts as done: a pruned one too
    study = optuna.load_study(study_name="median", storage=open_storage(storage))
    (pruned,) = study.get_trials(states=(TrialState.PRUNED,))
    assert pruned.params["cell"] == "no_tricks seed=0 lr=0.003" and pruned.user_attrs[PRUNED_ATTR] == 1
    assert pruned.intermediate_values[1] > sorted(t.intermediate_values[1] for t in study.get_trials(states=(TrialState.COMPLETE,)))[2]
    run = MlflowClient().get_run(pruned.user_attrs["mlflow_run_id"])
    assert run.info.status == "FINISHED" and run.data.tags[PRUNED_TAG] == "true" and run.data.tags["steps_run"] == "8"
    assert not checkpoint_path(run.info.run_id).exists()  # complete: no checkpoint left behind
    assert len(recorded_trials(study)) == len(study.trials) == 6
    assert "pruned" in capsys.readouterr().out  # the summary counts pruned cells
    assert main(argv) == 0 and len(study.trials) == 6  # a rerun trains nothing again
