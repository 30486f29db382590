"""`reproduce` (and what it shares with `resume`): the verdict, the runs it refuses, the stores it does not make."""
import re

import mlflow
import pytest
import torch
from mlflow import MlflowClient

from conftest import DATA_DIR, TINY_FLAGS, created_store, only_run, training_run
from cookbook.cli import main
from cookbook.reproduce import compare, stopped_after, through
from cookbook.tracking import PRUNED_TAG


def test_reproduce_reports_exact_match(mnist_dir, tracking, capsys):
    main(["train", "--config", "layernorm", *TINY_FLAGS])
    run_id = only_run().info.run_id
    capsys.readouterr()
    assert main(["reproduce", run_id]) == 0
    out = capsys.readouterr().out
    assert "train/loss" in out and "metrics reproduced exactly" in out and "MISMATCH" not in out
    assert re.search(r"^outcome \(tags\) +exact$", out, re.M)  # diverged and steps_run as tracked
    assert "differs from the tracked run" not in out
    MlflowClient().set_tag(run_id, "stacked_conv", "grouped")  # as if trained as a member of a stacked sweep cell
    main(["reproduce", run_id])
    assert "an exact match is not expected: stacked (tracked as a member of a stacked model, stacked_conv=grouped; here " \
           "alone)" in capsys.readouterr().out


@pytest.mark.parametrize("command,code", [(["reproduce", "0123456789abcdef"], 2), (["resume", "0123456789abcdef"], 2),
                                          (["sync"], 0)])
def test_commands_that_read_runs_make_no_store_where_there_is_none(command, code, tracking, tmp_path, monkeypatch, capsys):
    uri = f"sqlite:///{tmp_path}/typo.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    assert main(command) == code and not (tmp_path / "typo.db").exists()
    if code:  # sync has nothing to say of a store without runs
        assert capsys.readouterr().err.strip().splitlines() == [
            f"error: no tracking store at {uri}; point MLFLOW_TRACKING_URI at the store the runs are in"]


@pytest.mark.parametrize("command", ["reproduce", "resume"])
@pytest.mark.parametrize("run_id", ["0123456789abcdef", "", "../x"])  # the last two: MLflow's "invalid value", not "no run"
def test_an_unknown_or_malformed_run_id_is_one_line_error(command, run_id, tracking, capsys):
    created_store(tracking)
    assert main([command, run_id]) == 2
    last_line = capsys.readouterr().err.strip().splitlines()[-1]  # MLflow may log INFO lines first
    assert last_line.startswith(f"error: no run '{run_id}' in sqlite:///")


def test_reproduce_refuses_a_run_still_running_instead_of_reporting_every_metric_a_mismatch(tracking, capsys):
    client = MlflowClient(created_store(tracking))
    run_id = training_run(client, "live")  # RUNNING: training now, or its process died before sync ended it
    assert main(["reproduce", run_id]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: run {run_id} is still RUNNING: it trains, or its process died (`python -m cookbook sync` ends such a run "
        "with the steps it stored); reproduce compares a run that has ended")


@pytest.mark.parametrize("command", [["train", "--config", "no_tricks", *TINY_FLAGS],
                                     ["lr-find", "--config", "no_tricks", "--data-dir", str(DATA_DIR)],
                                     ["reproduce", "0123456789abcdef"], ["resume", "0123456789abcdef"], ["sync"]])
def test_a_store_file_that_is_not_a_database_is_one_line(command, tmp_path, tracking, monkeypatch, capsys):
    """Each was a traceback of 80-90 lines (SQLAlchemy's); the commands that would train refuse before any run. (A
    PostgreSQL store away goes the same way, checked by hand: MLflow retries its connection for 100 s first.)"""
    (tmp_path / "notes.db").write_text("not a database\n")
    uri = f"sqlite:///{tmp_path}/notes.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    mlflow.set_tracking_uri(uri)
    assert main(command) == (2 if command[0] in ("train", "lr-find") else 1)  # refused before, or failed reading
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: tracking store {uri}"), err
    assert (tmp_path / "notes.db").read_text() == "not a database\n"


def test_reproduce_detects_a_changed_history(mnist_dir, tracking, capsys):
    main(["train", "--config", "no_tricks", *TINY_FLAGS])
    run_id = only_run().info.run_id
    MlflowClient().log_metric(run_id, "train/loss", 123.0, step=3)  # tamper with one logged value
    assert main(["reproduce", run_id]) == 1
    assert "train/loss" in capsys.readouterr().out.split("differing:")[-1]


def test_a_run_stopped_short_is_compared_as_far_as_it_got(mnist_dir, tracking, tiny_data, capsys):
    """A KILLED (or pruned) run was compared with a rerun trained to the end: every metric a MISMATCH past its stop."""
    from test_checkpoint import StopAt

    from cookbook.config import CONFIGS_DIR, load_config
    from cookbook.tracking import MlflowTracker
    from cookbook.train import train
    cfg = load_config("batchnorm", CONFIGS_DIR, {"epochs": 2, "data": {"batch_size": 32, "train_subset": 256, "test_subset": 200},
                                                 "monitor": {"flush_every": 3, "layer_every": 4}})
    with pytest.raises(KeyboardInterrupt), MlflowTracker(cfg, tiny_data.md5, system_metrics=False, log_model=False) as tracker:
        train(cfg, tiny_data, [tracker, StopAt(11)])  # 8 steps an epoch: stopped in epoch 2, its flush of steps 11-13 stored
    assert MlflowClient().get_run(tracker.run_id).info.status == "KILLED"
    capsys.readouterr()
    assert main(["reproduce", tracker.run_id]) == 0
    out = capsys.readouterr().out
    assert "MISMATCH" not in out and "the run stopped after 14 steps (KILLED)" in out
    assert re.search(r"^train/loss +exact \(14 values\)$", out, re.M) and re.search(r"^test/acc +exact \(1 values\)$", out, re.M)


def test_a_rerun_is_cut_where_the_run_stopped():
    rerun = {"train/loss": [(s, 1.0) for s in range(16)], "epoch/train_loss": [(1, 1.0), (2, 0.5)], "grads/fc": [(0, 1.0), (12, 1.0)]}
    assert through(rerun, 12, 8) == {"train/loss": [(s, 1.0) for s in range(12)], "epoch/train_loss": [(1, 1.0)],
                                     "grads/fc": [(0, 1.0)]}
    assert through(rerun, 16, 8) == rerun
    assert stopped_after("FINISHED", {"steps_run": "16"}) is None and stopped_after("KILLED", {"steps_run": "12"}) == 12
    assert stopped_after("FINISHED", {"steps_run": "8", PRUNED_TAG: "true"}) == 8


def test_compare_covers_every_metric_either_side_has_step_by_step():
    rerun = {"train/loss": [(0, 2.3), (1, 2.0), (2, float("nan"))], "test/acc": [(1, 0.9)], "time/epoch_seconds": [(1, 3.0)]}
    hole = {"train/loss": [(0, 2.3), (2, float("nan"))], "time/epoch_seconds": [(1, 4.0)]}  # step 1 and test/acc not stored
    assert dict(compare(hole, rerun)) == {"train/loss": "MISMATCH at step 1: tracked 'nothing' vs rerun 2.0",
                                          "test/acc": "MISMATCH at step 1: tracked 'nothing' vs rerun 0.9"}
    assert dict(compare(rerun, rerun)) == {"train/loss": "exact (3 values)", "test/acc": "exact (1 values)"}  # NaN is NaN
    twice = {**rerun, "test/acc": [(1, 0.9), (1, 0.9)]}
    assert dict(compare(twice, rerun))["test/acc"] == "MISMATCH at 2 vs 1 values"


@pytest.mark.parametrize("tags,params,what", [({"lr_find": "all_tricks"}, {"config.seed": "0"}, "an LR range test (lr-find)"),
                                              ({}, {"other": "1"}, "a run without config.* params")])
def test_reproduce_and_resume_refuse_a_run_that_is_not_a_training(tags, params, what, tracking, capsys):
    client = MlflowClient(created_store(tracking))
    run_id = client.create_run(client.create_experiment("other"), tags=tags).info.run_id
    for key, value in params.items():
        client.log_param(run_id, key, value)
    for command in ("reproduce", "resume"):
        assert main([command, run_id]) == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == (
            f"error: run {run_id} is {what}, not a training: {command} takes the run of a `train`, a sweep cell or a stress trial")


def test_reproduce_runs_at_the_recorded_thread_count(mnist_dir, tracking, capsys):

    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)  # as a sweep worker with --workers 2 on 2 cores trains
        main(["train", "--config", "layernorm", *TINY_FLAGS])
        torch.set_num_threads(2)  # 1 vs 2 threads change 21 of 24 metric histories of this run
        capsys.readouterr()
        assert main(["reproduce", only_run().info.run_id]) == 0
        out = capsys.readouterr().out
        assert "reproducing with 1 torch thread(s), device cpu" in out and "MISMATCH" not in out
    finally:
        torch.set_num_threads(before)


