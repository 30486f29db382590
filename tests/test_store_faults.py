"""Real store faults during a real training: a tracking server SIGKILLed mid-run (and restarted), a full disk, a read-only
store. Each test checks the run's final status, its stored steps against the steps it trained, and the rest of the store."""
import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time

import pytest
from mlflow import MlflowClient

from conftest import DATA_DIR, WITH_ROOT
from mlflow_server import MlflowServer

EPOCHS, STEPS_PER_EPOCH = 60, 8  # 256 samples in batches of 32
TRAIN = ["--config", "no_tricks", "--epochs", str(EPOCHS), "--train-subset", "256", "--test-subset", "100",
         "--batch-size", "32", "--width", "0.25", "--data-dir", str(DATA_DIR), "--no-system-metrics", "--experiment", "faults"]
# (a quarter-width model: these tests are about the store, and steps 3x cheaper keep the training outlasting the outage)
SHORT_RETRIES = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "2"}  # MLflow's own retries: 0


def start_training(uri: str, cwd, **env) -> subprocess.Popen:
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **WITH_ROOT, **SHORT_RETRIES, **env}
    return subprocess.Popen([sys.executable, "-m", "cookbook", "train", *TRAIN], env=env, cwd=cwd,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def the_run(client: MlflowClient):
    exp = client.get_experiment_by_name("faults")
    runs = client.search_runs([exp.experiment_id]) if exp else []
    assert len(runs) <= 1, "one training, one run"
    return runs[0] if runs else None


def train_loss_steps(client: MlflowClient, run_id: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, "train/loss"))


def wait_for_steps(client: MlflowClient, proc: subprocess.Popen, n: int) -> None:
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        run = the_run(client)
        if run and len(train_loss_steps(client, run.info.run_id)) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"training did not store {n} steps: {proc.communicate()[1][-2000:]}")


def assert_complete(client: MlflowClient, status: str = "FINISHED") -> None:
    """The run ended with `status` and every step and epoch it trained: no hole, nothing twice."""
    run = the_run(client)
    assert run.info.status == status and run.info.end_time
    assert train_loss_steps(client, run.info.run_id) == list(range(EPOCHS * STEPS_PER_EPOCH))
    assert sorted(m.step for m in client.get_metric_history(run.info.run_id, "test/acc")) == list(range(1, EPOCHS + 1))
    assert run.data.tags["steps_run"] == str(EPOCHS * STEPS_PER_EPOCH) and "metrics_not_stored" not in run.data.tags


@pytest.mark.slow
def test_server_killed_mid_run_and_back_before_the_end_loses_nothing(tmp_path, mnist_dir):
    server = MlflowServer(tmp_path).start()
    client = MlflowClient(server.url)
    try:
        proc = start_training(server.url, tmp_path)
        wait_for_steps(client, proc, 24)
        server.kill()
        time.sleep(4)  # the training goes on, its writes pile up and are retried
        server.start()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
        assert_complete(client)
        assert not list((tmp_path / "mlflow-spool").glob("*"))
    finally:
        server.stop()


@pytest.mark.slow
def test_server_down_at_the_end_spools_and_sync_completes_the_run(tmp_path, mnist_dir):
    server = MlflowServer(tmp_path).start()
    client = MlflowClient(server.url)
    try:
        proc = start_training(server.url, tmp_path, COOKBOOK_FLUSH_TIMEOUT="1")
        wait_for_steps(client, proc, 24)
        server.kill()
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 1, err[-2000:]
        line = err.strip().splitlines()[-1]
        assert line.startswith(f"error: tracking store {server.url} unreachable") and "python -m cookbook sync" in line
        [spool] = (tmp_path / "mlflow-spool").glob("*.jsonl")
        server.start()
        assert the_run(client).info.status == "RUNNING"  # not FINISHED with holes: the end is in the spool
        sync = subprocess.run([sys.executable, "-m", "cookbook", "sync"], cwd=tmp_path, capture_output=True, text=True,
                              env={**os.environ, **WITH_ROOT})
        assert sync.returncode == 0, sync.stderr[-2000:]
        assert f"run {spool.stem}:" in sync.stdout and "run FINISHED" in sync.stdout
        assert_complete(client)
        assert not spool.exists()
    finally:
        server.stop()


@pytest.fixture
def tmpfs(tmp_path):
    """A 4 MB tmpfs (root only: skipped elsewhere)."""
    mount = tmp_path / "store"
    mount.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no `mount` command here")
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True)
    if made.returncode:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {made.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def store_rows(db) -> list[tuple]:
    """Every experiment and run in a SQLite store, read-only."""
    with contextlib.closing(sqlite3.connect(f"file:{db}?mode=ro", uri=True)) as con:
        return con.execute("SELECT name FROM experiments ORDER BY name").fetchall() + \
            con.execute("SELECT run_uuid, status FROM runs ORDER BY run_uuid").fetchall()


@pytest.mark.slow
def test_full_disk_stops_the_run_failed_with_what_was_stored(tmpfs, tmp_path, mnist_dir):
    uri = f"sqlite:///{tmpfs}/mlflow.db"
    client = MlflowClient(uri)
    client.search_experiments()  # the store's tables, then fill the disk but for ~300 KB
    (tmpfs / "filler").write_bytes(b"0" * (shutil.disk_usage(tmpfs).free - 300 * 1024))
    proc = start_training(uri, tmp_path)
    _, err = proc.communicate(timeout=600)
    assert proc.returncode == 1, err[-2000:]
    assert "Traceback" not in err
    line = err.strip().splitlines()[-1]
    assert line.startswith(f"error: tracking store {uri} cannot take writes (database or disk is full)")
    run = the_run(client)
    stored = train_loss_steps(client, run.info.run_id)
    assert run.info.status == "FAILED" and stored == list(range(len(stored))) and 0 < len(stored) < EPOCHS * STEPS_PER_EPOCH
    (tmpfs / "filler").unlink()  # space again: sync stores the rest; the run stays FAILED (it stopped early)
    sync = subprocess.run([sys.executable, "-m", "cookbook", "sync"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, **WITH_ROOT})
    assert sync.returncode == 0, sync.stderr[-2000:]
    run = client.get_run(run.info.run_id)
    trained = int(run.data.tags["steps_run"])
    assert run.info.status == "FAILED" and train_loss_steps(client, run.info.run_id) == list(range(trained))
    assert f"stopped after {trained} steps" in line


@pytest.mark.slow
def test_read_only_store_is_one_line_before_any_run(tmpfs, tmp_path, mnist_dir):
    uri = f"sqlite:///{tmpfs}/mlflow.db"
    made = "from mlflow import MlflowClient; MlflowClient().create_experiment('earlier')"  # in a process that then exits:
    subprocess.run([sys.executable, "-c", made], env={**os.environ, "MLFLOW_TRACKING_URI": uri}, check=True)  # no open file
    before = store_rows(tmpfs / "mlflow.db")
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    started = time.time()
    proc = start_training(uri, tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2 and time.time() - started < 60
    assert err.strip().splitlines() == [f"error: tracking store {uri} is read-only ({tmpfs} cannot be written); "
                                        "point MLFLOW_TRACKING_URI at a writable store"]
    assert store_rows(tmpfs / "mlflow.db") == before


@pytest.mark.slow
def test_full_store_is_one_line_before_any_run(tmpfs, tmp_path, mnist_dir):
    uri = f"sqlite:///{tmpfs}/mlflow.db"
    made = "from mlflow import MlflowClient; MlflowClient().create_experiment('earlier')"
    subprocess.run([sys.executable, "-c", made], env={**os.environ, "MLFLOW_TRACKING_URI": uri}, check=True)
    before = store_rows(tmpfs / "mlflow.db")
    (tmpfs / "filler").write_bytes(bytes(shutil.disk_usage(tmpfs).free - (16 << 10)))  # leave 16 KiB, under the 64 needed
    proc = start_training(uri, tmp_path)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    (line,) = err.strip().splitlines()
    assert line.startswith(f"error: tracking store {uri} is full (") and line.endswith(f" KiB free in {tmpfs})")
    assert store_rows(tmpfs / "mlflow.db") == before


def test_unreachable_server_at_the_start_is_one_line(tmp_path, mnist_dir):
    proc = start_training("http://127.0.0.1:9", tmp_path)  # port 9: nothing listens
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    line = err.strip().splitlines()[-1]
    assert line.startswith("error: tracking store http://127.0.0.1:9 cannot start the run (") and "Traceback" not in err
