"""Many processes starting together on a fresh SQLite store and a fresh journal: every one works (a real race)."""
import fcntl
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import pytest
from mlflow import MlflowClient

from conftest import DATA_DIR, WITH_ROOT
from cookbook.tracking import store_lock, store_unreadable

TINY = ["--epochs", "1", "--train-subset", "64", "--test-subset", "32", "--batch-size", "32", "--data-dir", str(DATA_DIR)]


@pytest.mark.slow
def test_sweeps_and_trainings_started_together_on_a_fresh_store(mnist_dir, tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **WITH_ROOT}
    journal = str(tmp_path / "journal.log")
    commands = [[sys.executable, "-m", "experiments.sweep", "run", "--configs", "no_tricks", "--seeds", str(seed),
                 "--storage", journal, "--experiment", "together", *TINY] for seed in (0, 1)]
    commands += [[sys.executable, "-m", "cookbook", "train", "--config", "batchnorm", "--seed", str(seed), "--experiment",
                  "together", "--no-system-metrics", *TINY] for seed in (0, 1, 2, 3)]
    procs = [subprocess.Popen(c, env=env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in commands]
    outputs = [p.communicate(timeout=600)[0] for p in procs]
    assert [p.returncode for p in procs] == [0] * len(procs), "\n".join(o[-1500:] for o in outputs)
    client = MlflowClient(uri)
    runs = client.search_runs([client.get_experiment_by_name("together").experiment_id])
    trained = [r for r in runs if r.data.tags.get("config")]
    assert len(trained) == 6 and {r.info.status for r in runs} == {"FINISHED"}
    assert all(len(client.get_metric_history(r.info.run_id, "train/loss")) == 2 for r in trained)


def test_a_reader_waits_for_the_tables_a_process_is_still_making(tracking, tmp_path):
    """A reader (analysis, resume) started while a sweep made a fresh store's tables raced MLflow's migrations, or read
    an empty store; it waits until they are made. The sweep's part is played here: the lock, the file, then the tables."""
    path = tmp_path / "fresh.db"
    uri = f"sqlite:///{path}"

    def read():
        return store_unreadable(uri) or MlflowClient(uri).get_experiment_by_name("made")

    with open(store_lock(path), "a") as lock, ThreadPoolExecutor(1) as pool:
        fcntl.flock(lock, fcntl.LOCK_EX)  # as ready_store holds it while MLflow makes the tables
        path.write_bytes(b"")  # SQLite's file exists from the first moment
        reader = pool.submit(read)
        time.sleep(1.0)
        assert not reader.done()
        MlflowClient(uri).create_experiment("made")  # the tables, and what the sweep makes first
        fcntl.flock(lock, fcntl.LOCK_UN)
        assert reader.result(timeout=60).name == "made"
