"""Sweeps on Optuna: grid validation, resumability, parallel workers, a worker killed with SIGKILL mid-cell."""
import os
import re
import signal
import subprocess
import sys
import time

import mlflow
import optuna
import pytest
from mlflow import MlflowClient
from optuna.trial import TrialState

from conftest import DATA_DIR, WITH_ROOT, training_victim
from cookbook.config import ConfigError
from cookbook.stop import pid_of
from experiments.grid import cell_key, given_order_name, make_cells, overrides, parse_list, study_name, sweep_name
from experiments.queue import open_study
from experiments.storage import SweepError, open_storage
from experiments.sweep import main
from postgres import postgres_server

TINY = ["--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64", "--data-dir", str(DATA_DIR)]


def test_grid_is_the_product_of_the_lists():
    cells = make_cells("no_tricks,all_tricks", "0,1", "1e-3,3e-2")
    assert len(cells) == 8 and len({cell_key(c) for c in cells}) == 8
    assert cell_key(cells[0]) == "no_tricks seed=0 lr=0.001"
    assert overrides(cells[0], {"epochs": 2}) == {"seed": 0, "optim": {"lr": 0.001}, "epochs": 2}
    sized = make_cells("all_tricks", "0", "", widths="0.5,2", depths="4", warmups="0,1")
    assert cell_key(sized[0]) == "all_tricks seed=0 width=0.5 depth=4 warmup_epochs=0"
    assert study_name(cells, {}) == study_name(make_cells("all_tricks,no_tricks", "1,0", "3e-2,1e-3"), {})  # lists' order
    assert [cell_key(c) for c in make_cells("no_tricks", "1000000,1000001", "1e-3")] == [
        "no_tricks seed=1000000 lr=0.001", "no_tricks seed=1000001 lr=0.001"]  # whole seeds: not two 'seed=1e+06'


def test_a_sweep_named_by_the_order_of_its_lists_is_resumed_under_that_name(tmp_path):
    """Sweeps were named by their cells in the order given; the same grid finds such a study instead of a new one."""
    cells, storage = make_cells("no_tricks,all_tricks", "0", "1e-3"), str(tmp_path / "journal.log")
    assert sweep_name(storage, cells, {}) == study_name(cells, {}) != given_order_name(cells, {})
    open_study(storage, given_order_name(cells, {}), cells, {})
    assert sweep_name(storage, cells, {}) == given_order_name(cells, {})


@pytest.mark.parametrize("kwargs,message", [
    ({"configs": "no_tricks,nope"}, "unknown config 'nope' in configs; available: all_tricks"),
    ({"lrs": "1e-3,fast"}, "lrs='1e-3,fast': every value must be a float"),
    ({"lrs": ","}, "lrs=',' is an empty list"),
    ({"lrs": "-1"}, "optim.lr=-1.0 must be a positive number"),
    ({"seeds": "0.5"}, "seeds='0.5': every value must be a int"),
    ({"seeds": "0,1,0"}, "the grid has cell 'no_tricks seed=0 lr=0.001' more than once"),
    ({"lrs": "1e-3,0.001"}, "the grid has cell 'no_tricks seed=0 lr=0.001' more than once"),
    ({"lrs": "0.001,0.0010000001"}, "(a repeated value, or two equal to 6 digits)"),
])
def test_bad_grids_fail_before_any_work(kwargs, message):
    args = {"configs": "no_tricks", "seeds": "0", "lrs": "1e-3", **kwargs}
    with pytest.raises((SweepError, ConfigError), match=re.escape(message)):
        make_cells(**args)


def test_a_warmup_is_checked_against_the_epochs_the_sweep_trains(tracking, capsys):
    assert len(make_cells("no_tricks", "0", "", warmups="0,10", settings={"epochs": 20})) == 2
    assert main(["run", "--configs", "no_tricks", "--epochs", "20", "--warmup-epochs", "0,10", "--storage", "redis://x"]) == 2
    assert "unknown scheme 'redis'" in capsys.readouterr().err  # the grid passed: its 10 warmup epochs fit in 20


def test_a_study_name_given_again_with_another_grid_or_settings_is_one_line(tmp_path):
    """Loaded as it is, the study would run its old grid and report it as the new one."""
    storage = str(tmp_path / "journal.log")
    open_study(storage, "named", make_cells("no_tricks", "0", "1e-3"), {"epochs": 2}, "none")
    assert open_study(storage, "named", make_cells("no_tricks", "0", "1e-3"), {"epochs": 2}, "none").user_attrs["cells"]
    for cells, settings in ((make_cells("no_tricks", "0", "1e-3,1e-2"), {"epochs": 2}), (make_cells("no_tricks", "0", "1e-3"), {})):
        with pytest.raises(SweepError, match=r"^study 'named' holds another sweep \(1 cells, settings \{'epochs': 2\}\); run it"):
            open_study(storage, "named", cells, settings, "none")


def test_an_empty_list_means_as_the_config_says():
    assert parse_list("", float, "lrs") == parse_list(None, float, "lrs") == [None]
    assert parse_list("1e-3, 3e-3", float, "lrs") == [0.001, 0.003]


def test_a_list_for_a_single_setting_is_one_line(tracking, tmp_path, capsys):
    storage = tmp_path / "journal.log"
    assert main(["run", "--configs", "no_tricks", "--epochs", "2,3", "--storage", str(storage)]) == 2
    assert capsys.readouterr().err.strip() == ("error: epochs='2,3' takes one value; the grid's lists are --configs, --seeds, --lrs, "
                                               "--widths, --depths, --warmup-epochs")
    assert not storage.exists()


@pytest.mark.parametrize("url,message", [
    ("redis://localhost/0", "unknown scheme 'redis'"),
    ("postgresql://u:p@127.0.0.1:1/db", "is unreachable or invalid: (psycopg.OperationalError) connection failed"),
    ("sqlite://", "is in memory: its workers could not see it"), ("sqlite:///:memory:", "is in memory"),
])
def test_bad_storage_is_one_line(url, message):
    with pytest.raises(SweepError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")):
        open_storage(url)


def test_a_worker_given_a_missing_or_other_kind_of_study_is_one_line(tmp_path, capsys, monkeypatch):
    """`work` joiners are started by hand on other machines: a wrong --study must not touch any study, nor make a store."""
    from experiments import stress
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")
    journal = tmp_path / "journal.log"
    assert stress.main(["work", "--study", "nope", "--n-trials", "1", "--storage", str(journal)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no study 'nope' in storage '{journal}' (no such journal file)")
    assert not journal.exists()
    sweep_study = open_study(str(journal), "grid", make_cells("no_tricks", "0", ""), {})
    sweep_study.enqueue_trial({"cell": "no_tricks seed=0"}, user_attrs={"queued_cell": "no_tricks seed=0"})
    assert stress.main(["work", "--study", "grid", "--n-trials", "1", "--storage", str(journal)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"study 'grid' in storage '{journal}' is not a stress study")
    assert [t.state for t in sweep_study.trials] == [TrialState.WAITING]  # its queued cell is untouched
    assert main(["work", "--study", "nope", "--storage", str(journal)]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no study 'nope' in storage '{journal}'")
    assert not (tmp_path / "mlflow.db").exists()
    assert main(["work", "--study", "grid", "--storage", str(journal), "--stack", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: stack=0 must be >= 1"
    database = tmp_path / "optuna.db"  # an RDB URL to a SQLite file that is not there: none made either
    assert main(["work", "--study", "nope", "--storage", f"sqlite:///{database}"]) == 2
    assert capsys.readouterr().err.strip().endswith(f"no study 'nope' in storage 'sqlite:///{database}' (no such database file)")
    assert not database.exists()
    stressed = optuna.create_study(study_name="stress-x", storage=open_storage(str(journal)), direction="maximize")
    stressed.set_user_attr("config", "no_tricks")
    with pytest.raises(SweepError, match=f"study 'stress-x' in storage '{journal}' is not a sweep"):
        open_study(str(journal), "stress-x", make_cells("no_tricks", "0", ""), {})
    with pytest.raises(SweepError, match="is not a sweep"):
        open_study(str(journal), "stress-x")
    assert set(stressed.user_attrs) == {"config"}


def test_a_journal_path_that_cannot_be_a_file_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(SweepError, match=r"^storage '.*' cannot be a journal file here \(Is a directory\)"):
        open_storage(str(tmp_path))
    for under in ("journal.log", "deeper/journal.log"):  # its folder is a file, or a folder above it ("File exists")
        with pytest.raises(SweepError, match=rf"^storage '.*': {tmp_path / 'a_file'} is a file, not a folder; give a journal"):
            open_storage(str(tmp_path / "a_file" / under))


def test_bad_input_touches_nothing(tracking, tmp_path, capsys):
    storage = tmp_path / "journal.log"
    assert main(["run", "--configs", "no_tricks,nope", "--storage", str(storage), *TINY]) == 2
    assert main(["run", "--configs", "no_tricks", "--storage", "redis://x", *TINY]) == 2
    assert main(["run", "--configs", "no_tricks", "--epochs", "0", "--storage", str(storage)]) == 2
    assert main(["run", "--configs", "no_tricks", "--widths", "1,1000", "--storage", str(storage), *TINY]) == 2
    (tmp_path / "a_file").write_text("")  # a data folder that cannot be one: refused here, not by each worker after the study
    assert main(["run", "--configs", "no_tricks", "--storage", str(storage), *TINY, "--data-dir", str(tmp_path / "a_file")]) == 2
    store = mlflow.get_tracking_uri()
    mlflow.set_tracking_uri("foo://bar")  # the study was made before the store failed (and exit 1)
    assert main(["run", "--configs", "no_tricks", "--storage", str(storage), *TINY]) == 2
    mlflow.set_tracking_uri(store)
    errors = [line for line in capsys.readouterr().err.strip().splitlines() if "download failed" not in line]  # data's note
    assert [e.split(":")[0] for e in errors] == ["error"] * 6 and "model.width=1000 model.depth=3 needs about" in errors[3]
    assert f"cannot write MNIST under {tmp_path / 'a_file'}" in errors[4] and "tracking store foo://bar cannot be used" in errors[5]
    assert not storage.exists() and mlflow.get_experiment_by_name("stability-cookbook") is None


def test_a_study_holding_another_grid_is_one_line(tracking, tmp_path):
    """Optuna's "Using an existing study" INFO line came first (a process of its own: Optuna's handler keeps the stderr
    it found at import)."""
    storage = str(tmp_path / "journal.log")
    open_study(storage, "named", make_cells("no_tricks", "0", ""), {})
    done = subprocess.run([sys.executable, "-m", "experiments.sweep", "run", "--configs", "batchnorm", "--study", "named",
                           "--storage", storage, *TINY], env={**os.environ, **WITH_ROOT}, capture_output=True, text=True)
    assert done.returncode == 2 and done.stderr.startswith("error: study 'named' holds another sweep")
    assert done.stderr.count("\n") == 1


def assert_intermediate_values(study):
    """Every finished cell reported its epoch's training loss to Optuna (a cell that diverged in epoch 1: nothing)."""
    for t in study.get_trials(states=(TrialState.COMPLETE,)):
        assert t.intermediate_values == ({} if t.user_attrs["diverged"] else {1: t.user_attrs["epoch/train_loss"]})


def finished_cells(storage, name):
    study = optuna.load_study(study_name=name, storage=open_storage(storage))
    return study, [t.params["cell"] for t in study.get_trials(states=(TrialState.COMPLETE,))]


def cell_runs(status=None):
    exp = mlflow.get_experiment_by_name("stability-cookbook")
    runs = MlflowClient().search_runs([exp.experiment_id], "tags.cell != ''" if status is None else
                                      f"attributes.status = '{status}'")
    return [r for r in runs if "cell" in r.data.tags]


@pytest.mark.slow
def test_two_workers_run_each_cell_once_and_a_rerun_skips_them(mnist_dir, tracking, tmp_path):
    storage = str(tmp_path / "journal.log")
    argv = ["run", "--configs", "no_tricks,batchnorm", "--seeds", "0", "--lrs", "1e-3,1e-1", "--workers", "2",
            "--storage", storage, "--study", "grid", *TINY]
    assert main(argv) == 0
    study, done = finished_cells(storage, "grid")
    assert sorted(done) == sorted(cell_key(c) for c in make_cells("no_tricks,batchnorm", "0", "1e-3,1e-1"))
    runs = cell_runs()
    assert len(runs) == 4 and {r.info.status for r in runs} == {"FINISHED"}
    parent = study.user_attrs["mlflow_parent_run_id"]
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {parent}
    assert len({t.user_attrs["worker"] for t in study.get_trials(states=(TrialState.COMPLETE,))}) == 2
    assert_intermediate_values(study)
    assert main(argv) == 0  # resume: nothing left to do
    assert len(study.get_trials()) == 4 and len(cell_runs()) == 4


@pytest.fixture(params=["journal", "postgresql"])
def storage_url(request, tmp_path):
    """The embedded default (a journal file) and a real PostgreSQL server on loopback."""
    if request.param == "journal":
        yield str(tmp_path / "journal.log")
    else:
        with postgres_server() as url:
            yield url


def wait_for_training_cell(storage, name, deadline):
    """The first RUNNING trial whose cell is training (its MLflow run exists and is RUNNING)."""
    while time.time() < deadline:
        time.sleep(0.5)
        try:
            study = optuna.load_study(study_name=name, storage=open_storage(storage))
        except (KeyError, SweepError):
            continue
        victim = training_victim(study.get_trials(states=(TrialState.RUNNING,)))
        if victim:
            return victim
    raise AssertionError("no cell started training")


@pytest.mark.slow
def test_sigkilled_worker_loses_only_its_cell(mnist_dir, tracking, storage_url):
    """Two workers on one grid; one is killed mid-cell and a replacement joins; each cell ends with one result.
    One epoch per cell: a cell killed after a checkpoint would be resumed into its run, which then ends FINISHED."""
    slow = ["--epochs", "1", "--train-subset", "4096", "--test-subset", "100", "--data-dir", str(DATA_DIR)]
    argv = ["--storage", storage_url, "--study", "kill"]
    env = {**os.environ, **WITH_ROOT}
    sweep = [sys.executable, "-m", "experiments.sweep"]
    grid = ["--configs", "no_tricks,layernorm,batchnorm", "--seeds", "0", "--workers", "2", *slow]
    coordinator = subprocess.Popen([*sweep, "run", *grid, *argv], env=env)
    victim = wait_for_training_cell(storage_url, "kill", time.time() + 300)
    os.kill(pid_of(victim.user_attrs["worker"]), signal.SIGKILL)
    replacement = subprocess.Popen([*sweep, "work", *argv], env=env)  # "restart it": a worker joining the study
    assert coordinator.wait(timeout=600) == 0 and replacement.wait(timeout=120) == 0
    study, done = finished_cells(storage_url, "kill")
    assert sorted(done) == sorted(["no_tricks seed=0", "layernorm seed=0", "batchnorm seed=0"])  # each exactly once
    assert study.trials[victim.number].state == TrialState.FAIL
    finished = cell_runs("FINISHED")
    assert sorted(r.data.tags["cell"] for r in finished) == sorted(done)
    assert MlflowClient().get_run(victim.user_attrs["mlflow_run_id"]).info.status == "KILLED"


def test_stacked_sweep_runs_seeds_of_a_cell_as_one_model(mnist_dir, tracking, tmp_path, monkeypatch):
    storage = str(tmp_path / "journal.log")
    monkeypatch.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "0.05")  # tiny cells (0.2 s) outlast a sample
    argv = ["run", "--configs", "no_tricks,batchnorm", "--seeds", "0,1,2", "--stack", "2", "--storage", storage,
            "--study", "stacked", *TINY]
    assert main(argv) == 0
    study, done = finished_cells(storage, "stacked")
    assert sorted(done) == sorted(cell_key(c) for c in make_cells("no_tricks,batchnorm", "0,1,2", ""))
    stacked = sorted(t.user_attrs["stacked"] for t in study.get_trials(states=(TrialState.COMPLETE,)))
    assert stacked == [1, 1, 2, 2, 2, 2]  # seeds queued side by side: (0, 1) stacked, 2 alone, per config
    assert_intermediate_values(study)
    runs = cell_runs()
    assert len(runs) == 6 and {r.info.status for r in runs} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in runs} == {study.user_attrs["mlflow_parent_run_id"]}
    assert all("test/acc" in r.data.metrics and r.data.params["config.seed"] == r.data.tags["seed"] for r in runs)
    assert all("system/cpu_utilization_percentage" in r.data.metrics for r in runs)  # cells sample system metrics
    figures = {a.path for a in MlflowClient().list_artifacts(study.user_attrs["mlflow_parent_run_id"], "study")}
    assert figures == {"study/param_importances.png", "study/parallel_coordinates.png"}  # config and seed were swept
    assert main(["run", "--stack", "0", "--storage", storage, *TINY]) == 2


def test_a_rerun_in_another_experiment_gets_a_parent_run_there(tracking, tmp_path):
    """The earlier parent (e.g. `mlflow run`'s, in Default) cannot be resumed in another experiment: MLflow refuses."""
    from experiments.sweep import start_parent_run
    study = open_study(str(tmp_path / "journal.log"), "moved", make_cells("no_tricks", "0", ""), {}, "none")
    with start_parent_run(study, "first") as first:
        study.set_user_attr("mlflow_parent_run_id", first.info.run_id)
    with start_parent_run(study, "first") as again:
        assert again.info.run_id == first.info.run_id
    with start_parent_run(study, "second") as second:
        assert second.info.experiment_id == mlflow.get_experiment_by_name("second").experiment_id
