"""Per-epoch checkpoints: a run stopped mid-epoch and resumed continues the uninterrupted run's exact history."""
import dataclasses
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest
import torch
from mlflow import MlflowClient

from conftest import DATA_DIR, WITH_ROOT, created_store, training_run
from cookbook.checkpoint import checkpoint_path, load, save
from cookbook.config import ConfigError, merge, validate
from cookbook.delivery import NOT_STORED_TAG, spool_path, write_spool
from cookbook.hooks import Hook, Recorder
from cookbook.resume import ResumedTracker, resumable
from cookbook.tracking import SPOOL_TAG
from cookbook.train import RESUMED_TAG, train


class StopAt(Hook):
    """Ctrl-C once the step `at` is flushed (as a kill mid-epoch would stop it)."""

    def __init__(self, at: int):
        self.at = at

    def on_metrics(self, rows):
        if any(step >= self.at for step, _ in rows):
            raise KeyboardInterrupt


def without_time(history: dict) -> dict:
    return {k: v for k, v in history.items() if not k.startswith("time/")}


@pytest.mark.parametrize("name,norm,max_norm", [("batchnorm", "batch", None), ("all", "layer", 1.0)])
def test_a_run_stopped_mid_epoch_resumes_to_the_uninterrupted_history(name, norm, max_norm, tiny_cfg, tiny_data, tmp_path):
    cfg = validate(merge(tiny_cfg, {"epochs": 3, "model": {"norm": norm}, "optim": {"max_norm": max_norm}}))
    whole = Recorder()
    want = train(cfg, tiny_data, [whole])
    path = tmp_path / "run.pt"
    first = Recorder()
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny_data, [first, StopAt(11)], checkpoint=path)  # 8 steps an epoch: stopped in epoch 2
    assert load(path)["epoch"] == 1 and load(path)["steps_run"] == 8
    tags, second = {}, Recorder()

    class Tags(Hook):
        def on_start(self, info):
            tags.update(info["tags"])

    got = train(cfg, tiny_data, [second, Tags()], checkpoint=path)
    assert tags[RESUMED_TAG] == "8" and load(path)["epoch"] == cfg.epochs  # its caller removes it once the end is stored
    per_epoch = lambda key: key.startswith(("epoch/", "test/"))  # noqa: E731  (logged at step = epoch)
    kept = {k: [(s, v) for s, v in series if s < (2 if per_epoch(k) else 8)] for k, series in first.history.items()}
    merged = {k: kept.get(k, []) + second.history.get(k, []) for k in without_time(whole.history)}
    assert second.history["train/loss"][0][0] == 8  # the resumed run starts at epoch 2's first step
    assert merged == without_time(whole.history)  # every metric, every step, bit for bit
    assert (got.steps_run, got.final.keys(), got.snapshots) == (want.steps_run, want.final.keys(), want.snapshots)
    assert {k: v for k, v in got.final.items() if not k.startswith("time/")} == \
           {k: v for k, v in want.final.items() if not k.startswith("time/")}
    assert all(torch.equal(a, b) for a, b in zip(got.model.state_dict().values(), want.model.state_dict().values()))


def test_without_a_checkpoint_file_the_run_starts_from_step_zero(tiny_cfg, tiny_data, tmp_path):
    rec = Recorder()
    train(dataclasses.replace(tiny_cfg, epochs=1), tiny_data, [rec], checkpoint=tmp_path / "none.pt")
    assert rec.history["train/loss"][0][0] == 0 and load(tmp_path / "none.pt")["epoch"] == 1


class StopInOnEnd(Hook):
    def on_end(self, result):
        raise KeyboardInterrupt  # SIGTERM while the model is being stored


def test_a_run_stopped_at_its_end_resumes_to_its_end_and_its_checkpoint_outlives_train(tiny_cfg, tiny_data, tmp_path):
    """Stopped in on_end, the run resumes (to its end). train() leaves the checkpoint to its caller: the tracker stores
    the model and the run's end after train() returns (test_signals kills a run there)."""
    cfg, path = dataclasses.replace(tiny_cfg, epochs=1), tmp_path / "run.pt"
    with pytest.raises(KeyboardInterrupt):
        train(cfg, tiny_data, [StopInOnEnd()], checkpoint=path)
    assert load(path)["epoch"] == 1
    rec = Recorder()
    assert train(cfg, tiny_data, [rec], checkpoint=path).steps_run == 8 and "train/loss" not in rec.history
    assert path.exists()


RUN = ["--config", "all_tricks", "--epochs", "3", "--train-subset", "2048", "--test-subset", "200", "--batch-size", "32", "--width", "0.5",
       "--data-dir", str(DATA_DIR), "--no-system-metrics", "--no-log-model", "--set", "monitor.flush_every=4",
       "--set", "monitor.layer_every=10", "--set", "monitor.snapshot_steps=[5, 70]"]  # 64 steps an epoch
PER_EPOCH = 64


def cli(*args, env, cwd, **kwargs):
    return subprocess.run([sys.executable, "-m", "cookbook", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600, **kwargs)


def histories(client: MlflowClient, run_id: str) -> dict:
    run = client.get_run(run_id)
    return {key: sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
            for key in run.data.metrics if not key.startswith(("time/", "system/"))}


@pytest.mark.slow
def test_sigkilled_run_resumes_from_its_checkpoint_to_the_uninterrupted_history(mnist_dir, tmp_path):
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db", **WITH_ROOT,
           "OMP_NUM_THREADS": "1"}  # one thread in both processes: bitwise results depend on the thread count
    assert cli("train", *RUN, "--experiment", "whole", env=env, cwd=tmp_path).returncode == 0
    proc = subprocess.Popen([sys.executable, "-m", "cookbook", "train", *RUN, "--experiment", "killed"], env=env,
                            cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline, run_id, stored = MlflowClient(env["MLFLOW_TRACKING_URI"]), time.time() + 300, None, 0
    while stored < PER_EPOCH + 20 and time.time() < deadline and proc.poll() is None:  # well into epoch 2
        time.sleep(0.05)
        exp = client.get_experiment_by_name("killed")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        if runs:
            run_id, stored = runs[0].info.run_id, len(client.get_metric_history(runs[0].info.run_id, "train/loss"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert client.get_run(run_id).info.status == "RUNNING" and stored < 3 * PER_EPOCH  # killed, mid-training
    assert client.get_run(run_id).data.tags[SPOOL_TAG] == str((tmp_path / "mlflow-spool" / f"{run_id}.jsonl").resolve())
    assert (tmp_path / "checkpoints" / f"{run_id}.pt").is_file()
    resumed = cli("resume", run_id, "--no-system-metrics", "--no-log-model", env=env, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming run" in resumed.stdout
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.tags["steps_run"] == str(3 * PER_EPOCH)
    assert int(run.data.tags[RESUMED_TAG]) in (PER_EPOCH, 2 * PER_EPOCH)
    whole_id = client.search_runs([client.get_experiment_by_name("whole").experiment_id])[0].info.run_id
    assert histories(client, run_id) == histories(client, whole_id)  # every metric, every step, bit for bit
    again = cli("resume", run_id, env=env, cwd=tmp_path)
    assert again.returncode == 2 and "finished; there is nothing to resume" in again.stderr


@pytest.mark.slow
def test_sweep_cell_of_a_sigkilled_worker_resumes_from_its_checkpoint(mnist_dir, tmp_path):
    """A worker killed in the cell's epoch 2; the next worker continues the same MLflow run from epoch 2."""
    from optuna.trial import TrialState

    from experiments.grid import make_cells
    from experiments.queue import enqueue_missing, open_study
    from experiments.storage import open_storage

    uri, storage = created_store(f"sqlite:///{tmp_path}/mlflow.db"), str(tmp_path / "journal.log")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **WITH_ROOT, "OMP_NUM_THREADS": "1"}
    settings = {"epochs": 3, "train_subset": 2048, "test_subset": 200, "batch_size": 32, "data_dir": str(DATA_DIR)}
    enqueue_missing(open_study(storage, "resume", make_cells("no_tricks", "0", ""), settings))
    worker = [sys.executable, "-m", "experiments.sweep", "work", "--study", "resume", "--storage", storage]
    proc = subprocess.Popen(worker, env=env, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline, run_id, stored = MlflowClient(uri), time.time() + 300, None, 0
    while stored < PER_EPOCH + 20 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.05)
        runs = [r for e in client.search_experiments() for r in client.search_runs([e.experiment_id])]
        if runs:
            run_id, stored = runs[0].info.run_id, len(client.get_metric_history(runs[0].info.run_id, "train/loss"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert stored < 3 * PER_EPOCH and (tmp_path / "checkpoints" / f"{run_id}.pt").is_file()
    assert subprocess.run(worker, env=env, cwd=tmp_path, capture_output=True, timeout=600).returncode == 0
    trials = optuna.load_study(study_name="resume", storage=open_storage(storage)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[1].user_attrs["mlflow_run_id"] == run_id  # the same run, continued
    epoch_losses = {m.step: m.value for m in client.get_metric_history(run_id, "epoch/train_loss")}
    assert trials[1].intermediate_values == epoch_losses and len(epoch_losses) == 3  # the pruner sees epoch 1 too
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and int(run.data.tags[RESUMED_TAG]) in (PER_EPOCH, 2 * PER_EPOCH)
    assert run.data.tags["trial"] == "1"
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(3 * PER_EPOCH))


def test_a_resume_stopped_before_it_passes_the_stored_steps_keeps_their_count(tracking, tiny_cfg):
    """steps_run is what the run stored: a resume interrupted while it replays stored steps must not lower it."""
    from mlflow.entities import Metric

    client = MlflowClient()
    run_id = training_run(client, "resumed")
    client.log_batch(run_id, metrics=[Metric("train/loss", 1.0, 0, step) for step in range(10)], synchronous=True)
    client.set_tag(run_id, "steps_run", "10")
    client.set_terminated(run_id, "KILLED")
    with pytest.raises(KeyboardInterrupt), ResumedTracker(tiny_cfg, {}, run_id, system_metrics=False) as tracker:
        tracker.on_metrics([(step, {"train/loss": 1.0}) for step in range(5, 8)])  # the epoch's replay, all stored
        raise KeyboardInterrupt
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.data.tags["steps_run"] == "10"
    assert len(client.get_metric_history(run_id, "train/loss")) == 10


@pytest.mark.parametrize("folder", [".", "elsewhere"])  # elsewhere: the run trained in another folder (its spool_file tag)
def test_a_run_with_spooled_writes_is_synced_before_it_resumes(folder, tracking, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    client = MlflowClient()
    run_id = training_run(client, "spooled")
    client.set_terminated(run_id, "KILLED")
    spool = spool_path(run_id, tmp_path / folder / "mlflow-spool").resolve()
    client.set_tag(run_id, SPOOL_TAG, str(spool))
    write_spool(spool, tracking, run_id, [{"op": "end", "status": "KILLED"}])
    with pytest.raises(ConfigError, match=f"spooled in {spool}; store them first with `python -m cookbook sync --spool-dir"):
        resumable(client, run_id)


def test_an_epoch_summary_stored_before_the_kill_is_not_stored_twice(tracking, tiny_cfg):
    """Killed after the epoch's summary was sent and before its checkpoint: the resume trains that epoch again."""
    from mlflow.entities import Metric
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    run_id = training_run(client, "resumed")
    client.log_batch(run_id, metrics=[Metric("test/acc", 0.5, 111, 2), Metric("time/epoch_seconds", 3.0, 111, 2)],
                     synchronous=True)
    client.set_terminated(run_id, "KILLED")
    with ResumedTracker(tiny_cfg, {}, run_id, system_metrics=False, log_model=False) as tracker:
        tracker.on_epoch_end(2, {"test/acc": 0.5, "time/epoch_seconds": 4.0, "epoch/train_loss": 0.3})
        tracker.on_epoch_end(3, {"test/acc": 0.6, "time/epoch_seconds": 4.0, "epoch/train_loss": 0.2})
    points = lambda key: [(m.step, m.value) for m in client.get_metric_history(run_id, key)]  # noqa: E731
    assert points("test/acc") == [(2, 0.5), (3, 0.6)] and points("time/epoch_seconds") == [(2, 3.0), (3, 4.0)]
    assert points("epoch/train_loss") == [(2, 0.3), (3, 0.2)]  # the value the store lacked is sent
    client.set_terminated(run_id, "KILLED")
    with ResumedTracker(tiny_cfg, {}, run_id, system_metrics=False, log_model=False) as tracker:
        def away(*args):
            raise MlflowException("API request to http://127.0.0.1:5000 failed with exception Connection refused")
        tracker.client.get_metric_history = away  # the store cannot say what it holds: send it all, never lose it
        tracker.on_epoch_end(4, {"test/acc": 0.7})
    assert points("test/acc") == [(2, 0.5), (3, 0.6), (4, 0.7)]


HOLE = [s for s in range(16) if s not in (5, 6, 7)]  # a batch the store refused, the steps after it stored


@pytest.mark.parametrize("stored_steps, summary, refused, resumes",
                         [(range(16), True, None, True), (range(12), True, None, False), (range(16), False, None, False),
                          (HOLE, True, None, False), (HOLE, True, "6", False)])
def test_a_checkpoint_past_what_the_store_holds_is_not_resumed(stored_steps, summary, refused, resumes, tracking, tmp_path,
                                                                monkeypatch):
    """Killed during an outage after its checkpoint: the steps it still had queued are nowhere; resumed, they'd be a hole.
    So is a batch the store refused (the run's metrics_not_stored)."""
    from mlflow.entities import Metric

    monkeypatch.chdir(tmp_path)
    client = MlflowClient()
    run_id = training_run(client, "hole")
    points = [Metric("train/loss", 1.0, 0, step) for step in stored_steps]
    client.log_batch(run_id, metrics=points + ([Metric("test/acc", 0.5, 0, 2)] if summary else []), synchronous=True)
    if refused:
        client.set_tag(run_id, NOT_STORED_TAG, refused)
    client.set_terminated(run_id, "KILLED")
    save(checkpoint_path(run_id), {"epoch": 2, "steps_run": 16, "final": {"test/acc": 0.5}})
    if resumes:
        assert resumable(client, run_id)[1] == checkpoint_path(run_id)
    else:
        why = "refused 6 of its metric values" if refused else r"after epoch 2 \(step 16\) but the store has .*"
        with pytest.raises(ConfigError, match=why + ".* train it again"):
            resumable(client, run_id)


@pytest.mark.parametrize("command", ["resume", "reproduce"])
def test_a_run_that_cannot_run_here_is_one_line_before_its_run_is_touched(command, tracking, tmp_path, monkeypatch, capsys):
    """A run tracked on a bigger machine (here: 1000x wider) is refused as `train` would refuse it, not trained into OOM."""
    from mlflow.entities import Metric, Param

    from cookbook.cli import main
    from cookbook.config import Config, to_params
    monkeypatch.chdir(tmp_path)
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("big")).info.run_id  # its params below
    cfg = validate(merge(Config(name="no_tricks"), {"model": {"width": 1000.0}}))
    client.log_batch(run_id, params=[Param(k, v) for k, v in to_params(cfg).items()], synchronous=True)
    client.log_batch(run_id, metrics=[Metric("train/loss", 1.0, 0, 0), Metric("test/acc", 0.5, 0, 1)], synchronous=True)
    client.set_terminated(run_id, "KILLED")
    save(checkpoint_path(run_id), {"epoch": 1, "steps_run": 1, "final": {"test/acc": 0.5}})
    assert main([command, run_id]) == 2
    assert "model.width=1000 model.depth=3 needs about" in capsys.readouterr().err.strip().splitlines()[-1]
    assert client.get_run(run_id).info.status == "KILLED"


def test_a_run_tracked_on_a_gpu_this_machine_lacks_is_one_line(tracking, gpus, monkeypatch, capsys):
    """Tracked on cuda:3 of a bigger machine; here one GPU: torch would assert on naming card 3, before any check."""
    from mlflow.entities import Param

    from cookbook.cli import main
    from cookbook.config import Config, to_params
    gpus(1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)

    def name(i):
        assert i < 1, "Invalid device id"  # as torch.cuda.get_device_name fails for a card that is not there
        return "Fake GPU 0"
    monkeypatch.setattr(torch.cuda, "get_device_name", name)
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("elsewhere")).info.run_id  # its params below
    client.log_batch(run_id, params=[Param(k, v) for k, v in to_params(Config(name="no_tricks")).items()], synchronous=True)
    client.set_tag(run_id, "device", "cuda:3")
    client.set_terminated(run_id, "FINISHED")
    assert main(["reproduce", run_id]) == 2
    assert "device='cuda:3' is not available here (1 CUDA devices)" in capsys.readouterr().err.strip().splitlines()[-1]
