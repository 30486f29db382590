"""The LR range test: its pure parts against closed forms, and one tiny tracked run."""
import math

import numpy as np
import pytest
from mlflow import MlflowClient

from conftest import DATA_DIR, created_store
from cookbook.cli import main
from cookbook.lr_find import exponential_lrs, lr_range_test, smooth, suggest

RANGE_FLAGS = ["--batch-size", "32", "--train-subset", "256", "--data-dir", str(DATA_DIR)]


def test_schedule_is_exponential_from_start_to_end():
    lrs = exponential_lrs(1e-6, 10.0, 8)
    assert lrs[0] == pytest.approx(1e-6) and lrs[-1] == pytest.approx(10.0)
    assert np.allclose(lrs[1:] / lrs[:-1], 10 ** (7 / 7))  # 7 decades in 7 steps: x10 each


def test_smoothing_is_bias_corrected():
    assert smooth([2.0] * 5, 0.98) == pytest.approx([2.0] * 5)  # no pull towards 0 at the start
    assert smooth([1.0, 3.0], 0.5) == pytest.approx([1.0, (0.5 * 0.5 + 0.5 * 3.0) / (1 - 0.25)])


def test_suggestions_on_a_known_curve():
    lrs = list(exponential_lrs(1e-5, 1.0, 51))  # 0.1 decade apart
    loss = [1 + (math.log10(lr) + 2) ** 2 for lr in lrs]  # minimum at 1e-2, steepest descent at the start
    steepest, min_over_10 = suggest(lrs, loss)
    assert min_over_10 == pytest.approx(1e-3) and steepest == pytest.approx(1e-5)
    drop = [2 - math.tanh(2 * (math.log10(lr) + 3)) + (math.log10(lr) + 1) ** 2 / 10 for lr in lrs]  # steepest at 1e-3
    steepest, min_over_10 = suggest(lrs, drop)
    assert steepest == pytest.approx(1e-3) and lrs[int(np.argmin(drop))] == pytest.approx(10 * min_over_10)


def test_no_finite_loss_suggests_nothing():
    assert all(math.isnan(lr) for lr in suggest([], []))


def test_range_test_stops_at_the_blow_up_and_suggests_inside_its_range(tiny_cfg, tiny_data):
    result = lr_range_test(tiny_cfg, tiny_data, start=1e-5, end=100.0, steps=100)
    assert result.blowup_lr is not None and len(result.lrs) < 100  # Adam at LR 100 blows up before the end
    assert result.smoothed[-1] > 4 * min(result.smoothed) and result.blowup_lr == result.lrs[-1]  # Smith's stop rule
    assert 1e-5 <= result.steepest_lr <= result.blowup_lr and 1e-6 <= result.min_over_10_lr <= result.blowup_lr


def test_lr_find_command_tracks_one_run(mnist_dir, tracking, capsys):
    assert main(["lr-find", "--config", "no_tricks", *RANGE_FLAGS, "--steps", "30", "--experiment", "lr"]) == 0
    out = capsys.readouterr().out
    assert "suggested LR: steepest descent" in out and "minimum/10" in out
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("lr").experiment_id])
    steps = len(client.get_metric_history(run.info.run_id, "lr_find/loss"))
    assert run.info.status == "FINISHED" and 3 <= steps <= 30 and run.data.tags["lr_find"] == "no_tricks"
    assert "config" not in run.data.tags  # the analysis must not read it as a training run
    assert 1e-6 <= float(run.data.tags["lr_find.steepest_lr"]) <= 10
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["lr_find.png"]


@pytest.mark.parametrize("lrs", [["--start-lr", "1", "--end-lr", "0.1"], ["--end-lr", "inf"], ["--start-lr", "1e-9", "--end-lr", "1e300"],
                                 ["--start-lr", "nan"], ["--steps", "10000000000"]])  # the last: 75 GiB of LRs
def test_a_range_that_is_not_finite_and_increasing_is_one_line_before_any_run(tracking, capsys, lrs):
    assert main(["lr-find", "--config", "no_tricks", *lrs, "--experiment", "lr"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: need 0 < --start-lr < --end-lr (finite, their ratio too)")
    assert MlflowClient().get_experiment_by_name("lr") is None


@pytest.mark.parametrize("experiment", ["gone", ""])
def test_an_experiment_it_cannot_log_into_is_one_line_before_the_test_runs(experiment, tracking, monkeypatch, capsys):
    """A deleted experiment or an invalid name: the whole test ran first, then exit 1 blaming the store."""
    client = MlflowClient(created_store(tracking))
    client.delete_experiment(client.create_experiment("gone"))
    monkeypatch.setattr("cookbook.lr_find.lr_range_test", lambda *a, **k: pytest.fail("the range test ran"))
    assert main(["lr-find", "--config", "no_tricks", *RANGE_FLAGS, "--experiment", experiment]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith(f"error: --experiment {experiment!r}: ")
    assert not [r for e in client.search_experiments(view_type=3) for r in client.search_runs([e.experiment_id], run_view_type=3)]


@pytest.mark.parametrize("flags,named", [(["--lr", "1e-7"], "optim.lr"), (["--epochs", "2"], "epochs"),
                                         (["--warmup-epochs", "1", "--set", "monitor.flush_every=3"],
                                          "schedule.warmup_epochs, monitor.flush_every"),
                                         (["--test-subset", "100"], "data.test_subset")])  # no test pass: it was accepted
def test_a_setting_the_range_test_would_ignore_is_one_line_before_any_run(tracking, capsys, flags, named):
    assert main(["lr-find", "--config", "no_tricks", *flags, "--experiment", "lr"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: lr-find sets each update's LR itself and runs --steps updates: {named} would be ignored")
    assert MlflowClient().get_experiment_by_name("lr") is None


def test_lr_find_help_marks_the_flags_it_refuses(capsys):
    """Its --help said "--lr: sets optim.lr", a flag that is always refused."""
    with pytest.raises(SystemExit):
        main(["lr-find", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--lr LR refused here: optim.lr is not used" in text and "--batch-size BATCH_SIZE sets data.batch_size" in text


def test_a_store_failing_while_the_curve_is_written_ends_the_run_failed_in_one_line(mnist_dir, tracking, capsys,
                                                                                     monkeypatch):
    from mlflow.exceptions import MlflowException

    from cookbook import range_run

    def store_away(*args):
        raise MlflowException("API request to http://127.0.0.1:5000 failed with exception Connection refused")

    monkeypatch.setattr(range_run, "send", store_away)
    assert main(["lr-find", "--config", "no_tricks", *RANGE_FLAGS, "--steps", "10", "--experiment", "lr"]) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # (MLflow's own INFO line about the new experiment before it)
    assert last.startswith("error: tracking store ") and last.endswith("Connection refused")
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("lr").experiment_id])
    assert run.info.status == "FAILED"  # not RUNNING for ever
