"""The run's writer: failed writes are kept and retried in order, refused ones make the run FAILED with a count."""
import errno
import json
import os
import shutil
import subprocess
import threading
import time

import pytest
from mlflow import MlflowClient
from mlflow.entities import LoggedModelStatus, Metric
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, RESOURCE_EXHAUSTED

from cookbook.delivery import (
    MODEL_STEPS_TAG,
    NOT_STORED_TAG,
    StoreWriter,
    first_line,
    metrics_op,
    replay,
    send,
    verdict,
    write_spool,
)
from cookbook.tracking import PROCESS_TAG, MlflowTracker, StoreUnusable


class FlakyClient(MlflowClient):
    """A real client whose first `failures` log_batch calls fail as an unreachable server does."""

    def __init__(self, uri: str, failures: int):
        super().__init__(uri)
        self.failures = failures

    def log_batch(self, *args, **kwargs):
        if self.failures:
            self.failures -= 1
            raise MlflowException("API request to http://127.0.0.1:5000 failed with exception Connection refused")
        return super().log_batch(*args, **kwargs)


def test_an_outage_delays_writes_but_keeps_them_in_order(tracking):
    client = FlakyClient(tracking, failures=3)
    run_id = client.create_run(client.create_experiment("flaky")).info.run_id
    writer = StoreWriter(client, run_id, max_backoff=0.05)
    writer.put(*metrics_op([(step, {"train/loss": 1.0 / (step + 1)}) for step in range(10)]))
    writer.put(*metrics_op([(step, {"train/loss": 1.0 / (step + 1)}) for step in range(10, 20)]))
    writer.end("FINISHED")
    assert writer.drain(30) and writer.not_stored == 0
    history = client.get_metric_history(run_id, "train/loss")
    assert sorted(m.step for m in history) == list(range(20)) and client.failures == 0
    assert client.get_run(run_id).info.status == "FINISHED"


def test_a_refused_metric_makes_the_run_failed_with_a_count(tracking, tiny_cfg, tiny_data):
    with MlflowTracker(tiny_cfg, tiny_data.md5, experiment="refused", system_metrics=False) as tracker:
        tracker.on_metrics([(0, {"train/loss": 2.3, "bad name!": 1.0})])  # MLflow refuses the name: the batch is refused
        tracker.on_metrics([(1, {"train/loss": 2.2})])
    run = MlflowClient().get_run(tracker.run_id)
    assert run.info.status == "FAILED" and run.data.tags[NOT_STORED_TAG] == "2"
    assert [m.step for m in MlflowClient().get_metric_history(tracker.run_id, "train/loss")] == [1]


def test_a_steps_values_are_never_split_between_writes():
    rows = [(step, {"train/loss": 1.0, "opt/lr": 0.1, "opt/grad_norm_preclip": 2.0}) for step in range(400)]
    ops = metrics_op(rows, now_ms=1)
    steps = [{s for _, _, _, s in op["metrics"]} for op in ops]
    assert [len(op["metrics"]) for op in ops] == [999, 201] and not steps[0] & steps[1]
    assert sum(len(op["metrics"]) for op in metrics_op([(0, {f"k{i}": 1.0 for i in range(2500)})])) == 2500  # a huge step


def test_replay_is_idempotent_and_reopens_a_run_closed_meanwhile(tracking, tmp_path):
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("replay")).info.run_id
    ops = metrics_op([(step, {"train/loss": float(step)}) for step in range(5)], now_ms=1)
    write_spool(tmp_path / "a.jsonl", tracking, run_id, [*ops, {"op": "end", "status": "FINISHED"}])
    client.log_batch(run_id, metrics=[Metric("train/loss", 0.0, 1, 0)], synchronous=True)  # landed before the spool
    client.set_terminated(run_id, "FAILED")  # e.g. `mlflow run` after the non-zero exit
    assert replay(tmp_path / "a.jsonl") == (2, 0, "FINISHED")
    assert sorted(m.step for m in client.get_metric_history(run_id, "train/loss")) == list(range(5))
    assert not (tmp_path / "a.jsonl").exists()


def test_replay_against_an_unreachable_store_keeps_the_file(tracking, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment("away")).info.run_id
    path = tmp_path / "b.jsonl"
    write_spool(path, "http://127.0.0.1:9", run_id, [{"op": "end", "status": "FINISHED"}])  # port 9: nothing listens
    stored, left, status = replay(path)
    assert (stored, left) == (0, 1) and status.startswith("not synced (") and path.exists()
    assert replay(path, tracking) == (1, 0, "FINISHED")  # the store given explicitly (it moved): synced
    assert not path.exists()


def test_a_spooled_model_is_stored_from_any_folder_and_a_gone_one_fails_the_run(tracking, tmp_path, monkeypatch):
    """`sync` may run elsewhere than the training; a model folder removed meanwhile is a refused write, not an empty
    model called READY."""
    import torch

    from cookbook.logged import save_model
    client = MlflowClient()
    experiment = client.create_experiment("models")
    kept, lost = (client.create_run(experiment).info.run_id for _ in range(2))
    monkeypatch.chdir(tmp_path)  # where the training ran
    for run_id in (kept, lost):
        net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
        op = {"op": "model", "path": str(save_model(net, run_id)), "step": 1, "metrics": [], "datasets": {}}
        write_spool(tmp_path / f"{run_id}.jsonl", tracking, run_id, [op, {"op": "end", "status": "FINISHED"}])
    shutil.rmtree(op["path"])  # the second run's folder
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")  # where `sync` runs
    assert replay(tmp_path / f"{kept}.jsonl") == (2, 0, "FINISHED")
    assert replay(tmp_path / f"{lost}.jsonl") == (2, 0, "FAILED")
    [model] = client.search_logged_models([experiment])
    assert model.source_run_id == kept and client.list_logged_model_artifacts(model.model_id)
    assert client.get_run(lost).data.tags[NOT_STORED_TAG] == "1" and not (tmp_path / "mlflow-spool" / f"{kept}.model").exists()


def test_a_model_the_writer_finished_after_its_spool_is_not_stored_twice(tracking, tmp_path, monkeypatch):
    """close() hands the op being sent to the spool; when the writer then finishes it, `sync` links that model instead of
    storing a second. A model whose sender stopped before it was READY is marked FAILED."""
    import torch

    from cookbook.logged import save_model
    client = MlflowClient()
    experiment = client.create_experiment("models")
    run_id = client.create_run(experiment).info.run_id
    monkeypatch.chdir(tmp_path)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 10))
    op = {"op": "model", "path": str(save_model(net, run_id)), "step": 3, "metrics": [["test/acc", 0.5, 1000, 3]],
          "datasets": {"evaluation": ["mnist-test", "abcd"]}}
    half = client.create_logged_model(experiment, name="model", source_run_id=run_id, tags={MODEL_STEPS_TAG: "3"})
    send(client, run_id, op)  # the writer, after close()
    write_spool(tmp_path / "run.jsonl", tracking, run_id, [op, {"op": "end", "status": "FINISHED"}])
    assert replay(tmp_path / "run.jsonl") == (2, 0, "FINISHED")
    [ready] = [m for m in client.search_logged_models([experiment]) if m.status == LoggedModelStatus.READY]
    assert client.get_logged_model(half.model_id).status == LoggedModelStatus.FAILED
    assert [o.model_id for o in client.get_run(run_id).outputs.model_outputs] == [ready.model_id]
    assert [(m.key, m.value) for m in client.get_logged_model(ready.model_id).metrics] == [("test/acc", 0.5)]


@pytest.mark.parametrize("stop,status", [(KeyboardInterrupt, "KILLED"), (NotADirectoryError, "FAILED")])
def test_a_stop_before_training_ends_the_new_run(stop, status, tracking, tiny_cfg, monkeypatch):
    """Ctrl-C or an artifact store that cannot be written, while the run is being described: it is ended, not left
    RUNNING, and it carries its process from its creation (what `sync` needs to close a run whose process died)."""
    from cookbook import tracking as tracking_module
    from cookbook.stop import process_id
    created = []
    monkeypatch.setattr(tracking_module, "mark_training", lambda client, run_id: created.append(run_id))

    def stopped(*args, **kwargs):
        assert MlflowClient().get_run(created[0]).data.tags[PROCESS_TAG] == process_id()
        raise stop("stopped")

    monkeypatch.setattr(tracking_module, "git_state", stopped)
    with pytest.raises(KeyboardInterrupt if stop is KeyboardInterrupt else StoreUnusable):
        with MlflowTracker(tiny_cfg, {}, system_metrics=False, log_model=False):
            pass
    assert MlflowClient().get_run(created[0]).info.status == status


def test_rows_handed_over_as_the_store_fills_are_spooled_not_dropped(tracking, tiny_cfg, tmp_path):
    """The flush that finds the store full stops the training, and its rows go to the spool with the rest."""
    from cookbook.delivery import spool_path
    from cookbook.errors import StoreFailure
    with pytest.raises(StoreFailure, match="cannot take writes"):
        with MlflowTracker(tiny_cfg, {}, system_metrics=False, log_model=False) as tracker:
            with tracker.writer.lock:
                tracker.writer.fatal = "database or disk is full"  # the writer stops at once, holding what is queued
                tracker.writer.lock.notify_all()
            tracker.on_metrics([(step, {"train/loss": 1.0}) for step in range(5)])
    ops = [json.loads(line) for line in spool_path(tracker.run_id).read_text().splitlines()[1:]]
    assert sorted(s for op in ops if op["op"] == "metrics" for _, _, _, s in op["metrics"]) == list(range(5))
    assert tracker.steps_logged == 5 and MlflowClient().get_run(tracker.run_id).info.status == "FAILED"


def test_the_failed_status_of_a_run_on_a_full_store_is_waited_on_for_at_most_stop_timeout(tracking, tiny_cfg, monkeypatch):
    """Behind a tracking server, MLflow retries that best-effort call for minutes; the run's end must not wait on it."""
    from cookbook.errors import StoreFailure
    from cookbook.sampler import STOP_TIMEOUT
    asked = threading.Event()

    def hung(run_id, status):  # a server that neither answers nor refuses
        asked.set()
        threading.Event().wait(60)

    with pytest.raises(StoreFailure, match="cannot take writes"):
        with MlflowTracker(tiny_cfg, {}, system_metrics=False, log_model=False) as tracker:
            monkeypatch.setattr(tracker.client, "set_terminated", hung)
            with tracker.writer.lock:
                tracker.writer.fatal = "database or disk is full"
                tracker.writer.lock.notify_all()
            start = time.monotonic()
            tracker.on_metrics([(0, {"train/loss": 1.0})])
    assert asked.is_set() and time.monotonic() - start < STOP_TIMEOUT + 3


def test_verdicts():
    assert verdict(MlflowException("(sqlite3.OperationalError) database or disk is full")) == "fatal"
    assert verdict(MlflowException("attempt to write a readonly database")) == "fatal"
    assert verdict(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE)) == "rejected"
    assert verdict(MlflowException("API request failed: Connection refused")) == "retry"
    assert verdict(MlflowException("slow down", error_code=RESOURCE_EXHAUSTED)) == "retry"
    assert verdict(ConnectionError("reset")) == "retry"
    assert verdict(ConnectionRefusedError(errno.ECONNREFUSED, "Connection refused")) == "retry"  # an OSError too
    for code in (errno.EACCES, errno.EPERM):  # a local artifact store: retried until the flush timeout, then "unreachable"
        assert verdict(PermissionError(code, os.strerror(code), "mlruns/1")) == "fatal"
    assert verdict(MlflowException("INTERNAL_ERROR: [Errno 13] Permission denied: '/srv/artifacts'")) == "fatal"  # a server's
    autoflush = MlflowException("(raised as a result of Query-invoked autoflush; consider using a session.no_autoflush "
                                "block if this flush is occurring prematurely)\n(sqlite3.OperationalError) database or disk "
                                "is full\n[SQL: INSERT INTO metrics]")
    assert verdict(autoflush) == "fatal" and first_line(autoflush) == "database or disk is full"


def test_an_artifact_folder_the_store_may_not_write_fails_the_run_at_once(tracking, tiny_cfg):
    """`chattr +i` (root ignores permission bits): the write is refused with EPERM; the run ends FAILED without waiting
    out the flush timeout, and the line says the store cannot take writes (not that it is unreachable)."""
    from mlflow.utils.file_utils import local_file_uri_to_path

    from cookbook.delivery import FLUSH_TIMEOUT
    from cookbook.errors import StoreFailure
    from cookbook.train import TrainResult
    start, folder = time.monotonic(), None
    try:
        with pytest.raises(StoreFailure, match=r"cannot take writes \(\[Errno 1\] Operation not permitted.*once it takes writes"):
            with MlflowTracker(tiny_cfg, {}, experiment="denied", system_metrics=False, log_model=False) as tracker:
                folder = local_file_uri_to_path(MlflowClient().get_run(tracker.run_id).info.artifact_uri)
                if subprocess.run(["chattr", "+i", folder], capture_output=True).returncode:
                    pytest.skip("chattr +i is not supported here")
                tracker.on_end(TrainResult(steps_run=0, total_steps=8))  # its snapshot table goes to the artifact store
    finally:
        if folder:
            subprocess.run(["chattr", "-i", folder], capture_output=True)
    assert MlflowClient().get_run(tracker.run_id).info.status == "FAILED" and time.monotonic() - start < FLUSH_TIMEOUT / 2
