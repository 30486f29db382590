"""Real signals to a real training process: the run ends KILLED with every step it trained, the exit code says which."""
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import DATA_DIR, WITH_ROOT, created_store
from cookbook.hooks import Hook

LONG = ["--config", "no_tricks", "--epochs", "3000", "--train-subset", "256", "--test-subset", "100", "--batch-size", "32",
        "--data-dir", str(DATA_DIR), "--no-system-metrics", "--experiment", "signals"]  # 24,000 steps: never done before the signal


def stored_steps(client: MlflowClient) -> tuple[str | None, int]:
    exp = client.get_experiment_by_name("signals")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    if not runs:
        return None, 0
    return runs[0].info.run_id, len(client.get_metric_history(runs[0].info.run_id, "train/loss"))


@pytest.mark.slow
@pytest.mark.parametrize("sig,code,name", [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "SIGINT")])
def test_signal_ends_the_run_killed_with_every_trained_step(mnist_dir, tmp_path, sig, code, name):
    uri = created_store(f"sqlite:///{tmp_path}/mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **WITH_ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "cookbook", "train", *LONG], env=env, cwd=tmp_path,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client, deadline = MlflowClient(uri), time.time() + 300
    while stored_steps(client)[1] < 60 and time.time() < deadline and proc.poll() is None:
        time.sleep(0.5)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err[-2000:]
    assert err.strip().splitlines()[-1].startswith(f"stopped by {name}; any run it had started ended KILLED")
    run_id, steps = stored_steps(client)
    run = client.get_run(run_id)
    assert run.info.status == "KILLED" and run.info.end_time is not None and run.data.tags["stopped_by"] == name
    history = sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))
    assert history == list(range(steps)) and int(run.data.tags["steps_run"]) == steps >= 60  # no hole, nothing lost


def test_interrupt_mid_flush_window_keeps_the_buffered_steps(mnist_dir, tracking, tiny_cfg, tiny_data, monkeypatch):
    """Ctrl-C at step 11 (8 steps per epoch, flush every 5): steps 8-10 were only buffered, yet 0-10 are all stored."""
    import dataclasses

    from cookbook import train as train_module
    from cookbook.tracking import MlflowTracker

    real_step, calls = train_module.StepRunner.__call__, []

    def step_or_interrupt(runner, idx, norms):
        calls.append(idx)
        if len(calls) == 12:  # update number 11
            raise KeyboardInterrupt
        return real_step(runner, idx, norms)

    monkeypatch.setattr(train_module.StepRunner, "__call__", step_or_interrupt)
    cfg = dataclasses.replace(tiny_cfg, monitor=dataclasses.replace(tiny_cfg.monitor, flush_every=5))
    with pytest.raises(KeyboardInterrupt):
        with MlflowTracker(cfg, tiny_data.md5, experiment="interrupt", system_metrics=False) as tracker:
            train_module.train(cfg, tiny_data, [tracker])
    client = MlflowClient()
    run = client.get_run(tracker.run_id)
    assert run.info.status == "KILLED" and run.data.tags["steps_run"] == "11"
    assert sorted(m.step for m in client.get_metric_history(tracker.run_id, "train/loss")) == list(range(11))


@pytest.mark.slow
def test_sigkilled_training_is_ended_killed_by_sync_with_the_steps_it_stored(mnist_dir, tmp_path):
    uri = created_store(f"sqlite:///{tmp_path}/mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **WITH_ROOT}
    proc = subprocess.Popen([sys.executable, "-m", "cookbook", "train", *LONG], env=env, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    client, deadline = MlflowClient(uri), time.time() + 300
    while stored_steps(client)[1] < 60 and time.time() < deadline:
        time.sleep(0.5)
    alive = client.create_run(client.get_experiment_by_name("signals").experiment_id).info.run_id  # another process's
    client.set_tag(alive, "process", f"{socket.gethostname()}:{os.getpid()}")  # run, still alive: left alone
    proc.kill()
    proc.wait()
    sync = subprocess.run([sys.executable, "-m", "cookbook", "sync"], env=env, cwd=tmp_path, capture_output=True, text=True)
    assert sync.returncode == 0, sync.stderr[-2000:]
    killed = next(r for r in client.search_runs([client.get_experiment_by_name("signals").experiment_id]) if r.info.run_id != alive)
    steps = len(client.get_metric_history(killed.info.run_id, "train/loss"))
    assert f"run {killed.info.run_id}: its process is gone; ended KILLED with the {steps} steps it stored" in sync.stdout
    assert killed.info.status == "KILLED" and killed.data.tags["steps_run"] == str(steps) and steps >= 60
    assert client.get_run(alive).info.status == "RUNNING"


class DownClient(MlflowClient):
    """A real client whose writes fail as an unreachable tracking server's do."""

    def log_batch(self, *args, **kwargs):
        from mlflow.exceptions import MlflowException
        raise MlflowException("API request to http://127.0.0.1:5000 failed with exception Connection refused")


def test_a_signal_while_the_end_waits_on_the_store_spools_what_it_has_not_taken(tracking, tiny_cfg, tmp_path, monkeypatch):
    """The store is away as the run ends; Ctrl-C cuts the 60 s wait short, and every step is in the spool, not lost."""
    import threading

    from cookbook.delivery import replay, spool_path
    from cookbook.stop import stop_on_signals
    from cookbook.tracking import MlflowTracker

    monkeypatch.chdir(tmp_path)  # the spool folder is relative to where the command runs
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        with MlflowTracker(tiny_cfg, {}, experiment="hung", system_metrics=False, flush_timeout=60) as tracker:
            tracker.writer.client = DownClient(tracking)
            tracker.on_metrics([(step, {"train/loss": 1.0 / (step + 1)}) for step in range(5)])
            threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGINT)).start()  # while __exit__ waits on the store
    assert time.monotonic() - started < 30  # the signal ended the wait
    spool = spool_path(tracker.run_id)
    assert spool.is_file() and replay(spool) == (2, 0, "FINISHED")  # the steps and the run's end, stored by `sync`
    assert sorted(m.step for m in MlflowClient().get_metric_history(tracker.run_id, "train/loss")) == list(range(5))


class SignalsWhileHandedRows(Hook):
    """Sends this process SIGINT as it is handed the rows of the third flush (a signal mid-handover)."""

    def __init__(self):
        self.flushes, self.last_step = 0, -1

    def on_metrics(self, rows):
        self.flushes += 1
        self.last_step = max([self.last_step] + [step for step, _ in rows])
        if self.flushes == 3:
            os.kill(os.getpid(), signal.SIGINT)  # its handler runs at once, here, in the main thread


def test_a_signal_while_rows_are_handed_over_reaches_every_hook_first(tiny_cfg, tiny_data):
    """The hook after the one the signal interrupts still gets those rows: no step trained is lost to it."""
    from cookbook.hooks import Recorder
    from cookbook.stop import stop_on_signals
    from cookbook.train import train

    signaller, recorder = SignalsWhileHandedRows(), Recorder()
    with pytest.raises(KeyboardInterrupt), stop_on_signals():
        train(tiny_cfg, tiny_data, [signaller, recorder])
    steps = [step for step, _ in recorder.history["train/loss"]]
    assert signaller.flushes >= 3 and steps == list(range(signaller.last_step + 1))


@pytest.mark.slow
def test_a_run_killed_while_its_model_is_stored_resumes_to_its_end(mnist_dir, tmp_path):
    """The model's upload is a trained run's last act. SIGKILLed there, the run was left KILLED without its checkpoint
    (train() had removed it), so resume refused it: the checkpoint now goes only once the run's end is stored."""
    uri = created_store(f"sqlite:///{tmp_path}/mlflow.db")
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **WITH_ROOT}
    killed = ("import os, signal, sys, cookbook.delivery as d; from cookbook.cli import main; "
              "d.send_model = lambda *a: os.kill(os.getpid(), signal.SIGKILL); sys.exit(main(sys.argv[1:]))")
    tiny = [*LONG[:2], "--epochs", "2", *LONG[4:], "--train-subset", "64"]  # the later --train-subset wins: 4 steps
    proc = subprocess.run([sys.executable, "-c", killed, "train", *tiny], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    run_id, stored = stored_steps(MlflowClient(uri))
    assert stored == 4 and (tmp_path / "checkpoints" / f"{run_id}.pt").is_file()
    resumed = subprocess.run([sys.executable, "-m", "cookbook", "resume", run_id, "--no-system-metrics"], env=env,
                             cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    client = MlflowClient(uri)
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and [o.step for o in run.outputs.model_outputs] == [4]
    assert not (tmp_path / "checkpoints").exists() and not list((tmp_path / "mlflow-spool").glob("*"))


class SignalsAtEpochEnd(Hook):
    """SIGTERM from the first hook's epoch-end of epoch 2: the progress line shown, the tracker not yet told."""

    def on_epoch_end(self, epoch, metrics):
        if epoch == 2:
            os.kill(os.getpid(), signal.SIGTERM)


@pytest.mark.parametrize("stacked", [False, True])
def test_a_signal_at_an_epochs_end_waits_until_every_hook_has_its_summary_and_it_is_saved(tiny_cfg, tiny_data, tmp_path, stacked):
    """The run's steps_run counts epoch 2: its summary must reach the tracker (else reproduce finds it missing) and its
    checkpoint be saved (else resume trains it again)."""
    from cookbook.checkpoint import load
    from cookbook.hooks import Recorder
    from cookbook.stacked import train_stacked
    from cookbook.stop import Terminated, stop_on_signals
    from cookbook.train import train

    tiny_cfg.epochs, recorder, checkpoint = 3, Recorder(), tmp_path / "run.pt"
    with pytest.raises(Terminated), stop_on_signals():
        if stacked:
            train_stacked([tiny_cfg], tiny_data, [[SignalsAtEpochEnd(), recorder]])
        else:
            train(tiny_cfg, tiny_data, [SignalsAtEpochEnd(), recorder], checkpoint=checkpoint)
    assert [epoch for epoch, _ in recorder.history["epoch/train_loss"]] == [1, 2]
    assert stacked or load(checkpoint)["epoch"] == 2
