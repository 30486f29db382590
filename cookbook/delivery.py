"""A run's writes reach the tracking store in order: retried through outages, spooled to disk if the run ends first.

Training never waits on the store: writes are queued and a background thread sends them one by one,
keeping a failed write at the head of the queue until the store takes it. What is still queued when the
run ends (after FLUSH_TIMEOUT seconds of trying) goes to a spool file that `python -m cookbook sync`
replays later. Metric writes are idempotent (MLflow drops exact duplicates), so a write that landed
just before it was spooled is harmless to send again.
"""
from __future__ import annotations

import collections
import errno
import json
import logging
import os
import re
import shutil
import threading
import time
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import LoggedModelOutput, LoggedModelStatus, Metric, RunTag
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE

from .files import remove_if_empty, write_whole

SPOOL_DIR = os.environ.get("COOKBOOK_SPOOL_DIR", "mlflow-spool")  # relative to where the command runs
FLUSH_TIMEOUT = float(os.environ.get("COOKBOOK_FLUSH_TIMEOUT", "60"))  # seconds a run's end waits for the store
NOT_STORED_TAG = "metrics_not_stored"  # on a FAILED run: metric values the store refused (1 for any other refused write)
MODEL_STEPS_TAG = "trained_steps"  # on a LoggedModel: the training steps behind it (with its run, which model it is)
TEST_METRICS = "test/"  # metric names measured on the test set; the others on the training set
MAX_BATCH = 1000  # log_batch accepts at most 1000 metrics per call
SQLALCHEMY_NOTE = "(raised as a result of "  # how SQLAlchemy's note on a failed autoflush starts its line
# Store errors that retrying cannot cure: stop training and say so (by their text: a server passes on only that).
FATAL = ("database or disk is full", "readonly database", "read-only file system", "no space left on device",
         "permission denied", "operation not permitted")
FATAL_ERRNOS = (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT)  # a local store's OSError
# MLflow's SQL store logs each failed write with a full traceback; the writer reports store errors in one line itself.
logging.getLogger("mlflow.store.db.utils").setLevel(logging.CRITICAL)
Op = dict  # one JSON-able write: {"op": "metrics"|"tags"|"text"|"model"|"end", ...}


def metrics_op(rows, now_ms: int | None = None) -> list[Op]:
    """Ops for (step, {name: value}) rows, timestamped now (the timestamp makes a resend a duplicate, not a new point).
    A step's values go in one op (unless it alone has more than MAX_BATCH): a kill between two writes leaves whole steps,
    which is what a resume checks for."""
    now = int(time.time() * 1000) if now_ms is None else now_ms
    batches: list[list] = [[]]
    for step, metrics in rows:
        values = [[key, float(value), now, step] for key, value in metrics.items()]
        if len(batches[-1]) + len(values) > MAX_BATCH:
            batches.append([])
        batches[-1] += values
    return [{"op": "metrics", "metrics": b[i : i + MAX_BATCH]} for b in batches if b for i in range(0, len(b), MAX_BATCH)]


def linked_metrics(values: list, model_id: str, datasets: dict[str, list[str]]) -> list[Metric]:
    """[key, value, timestamp, step] values logged again, linked to the model and to the data set each was measured on
    (datasets: {'training' | 'evaluation': [name, digest]}). Same timestamps: the run's history keeps one point each."""
    metrics = []
    for key, value, timestamp, step in values:
        name, digest = datasets.get("evaluation" if key.startswith(TEST_METRICS) else "training", [None, None])
        metrics.append(Metric(key, value, timestamp, step, model_id=model_id, dataset_name=name, dataset_digest=digest))
    return metrics


def send(client: MlflowClient, run_id: str, op: Op) -> None:
    """Perform one write against the store (raises what the store raises)."""
    if op["op"] == "metrics":
        client.log_batch(run_id, metrics=[Metric(k, v, t, s) for k, v, t, s in op["metrics"]], synchronous=True)
    elif op["op"] == "tags":
        client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in op["tags"].items()], synchronous=True)
    elif op["op"] == "text":
        client.log_text(run_id, op["text"], op["path"])
    elif op["op"] == "model":
        send_model(client, run_id, op)
    elif op["op"] == "end":
        status, not_stored = op["status"], op.get("not_stored", 0)
        if not_stored:
            client.log_batch(run_id, tags=[RunTag(NOT_STORED_TAG, str(not_stored))], synchronous=True)
            status = "FAILED" if status == "FINISHED" else status
        client.set_terminated(run_id, status)


def send_model(client: MlflowClient, run_id: str, op: Op) -> None:
    """An MLflow 3 LoggedModel from a saved model folder, linked to the run as its output. Sent again (the writer finished
    it after the run's end had spooled it), it links the model already stored instead of storing a second one."""
    run = client.get_run(run_id)
    model_id = stored_model(client, run, op["step"])
    if model_id is None:
        if not Path(op["path"]).is_dir():  # MLflow would upload nothing and call the empty model READY
            raise MlflowException(f"model folder {op['path']} is gone", error_code=INVALID_PARAMETER_VALUE)
        model_id = client.create_logged_model(run.info.experiment_id, name="model", source_run_id=run_id,
                                              tags={MODEL_STEPS_TAG: str(op["step"])}).model_id
        client.log_model_artifacts(model_id, op["path"])
        client.finalize_logged_model(model_id, "READY")
    if model_id not in {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}:
        client.log_outputs(run_id, [LoggedModelOutput(model_id, op["step"])])
    client.log_batch(run_id, metrics=linked_metrics(op.get("metrics", []), model_id, op.get("datasets", {})), synchronous=True)


def stored_model(client: MlflowClient, run, steps: int) -> str | None:
    """The READY model of the run after `steps` training steps, if one is stored; a half-stored one (its sender stopped
    before it was READY) is marked FAILED, so that nobody takes it for a model."""
    query = f"source_run_id = '{run.info.run_id}' AND tags.{MODEL_STEPS_TAG} = '{steps}'"
    for model in client.search_logged_models([run.info.experiment_id], filter_string=query):
        if model.status == LoggedModelStatus.READY:
            return model.model_id
        if model.status == LoggedModelStatus.PENDING:
            client.finalize_logged_model(model.model_id, LoggedModelStatus.FAILED)
    return None


def verdict(error: Exception) -> str:
    """'fatal' (store full, read-only or not ours to write), 'rejected' (the store refuses this write for good) or 'retry' (outage)."""
    text = str(error).lower()
    if (isinstance(error, OSError) and error.errno in FATAL_ERRNOS) or any(s in text for s in FATAL):
        return "fatal"
    if isinstance(error, MlflowException) and 400 <= error.get_http_status_code() < 500 and error.get_http_status_code() != 429:
        return "rejected"
    return "retry"


def first_line(error: Exception) -> str:
    """The error's first line without SQLAlchemy's '(module.Error) ' prefix, nor the note on autoflush SQLAlchemy may put
    on a line before it (the line then named no cause: "cannot take writes ((raised as a result of Query-invoked...))")."""
    lines = [line for line in str(error).strip().splitlines() if not line.startswith(SQLALCHEMY_NOTE)]
    return re.sub(r"^\([\w.]+\)\s*", "", (lines or [type(error).__name__])[0])[:200]


class StoreWriter:
    """Sends ops to one run in order on a daemon thread; a failed op stays queued and is retried with backoff."""

    def __init__(self, client: MlflowClient, run_id: str, max_backoff: float = 5.0):
        self.client, self.run_id, self.max_backoff = client, run_id, max_backoff
        self.queue: collections.deque[Op] = collections.deque()
        self.lock = threading.Condition()
        self.fatal: str | None = None  # first line of a store error that retrying cannot cure
        self.not_stored = 0  # metric values the store refused for good
        self.outage: str | None = None  # the last transient error, while it lasts
        self.closed = False
        self.one_by_one = 0  # after a refused merged batch: how many ops to send singly
        threading.Thread(target=self._loop, daemon=True, name=f"store-writer-{run_id[:8]}").start()

    def put(self, *ops: Op) -> None:
        with self.lock:
            self.queue.extend(ops)
            self.lock.notify_all()

    def end(self, status: str) -> None:
        """Queue the run's end: `status`, or FAILED with a count if the store refused metric values."""
        with self.lock:
            self.queue.append({"op": "end", "status": status, "not_stored": self.not_stored})
            self.lock.notify_all()

    def _next(self) -> tuple[Op, int]:
        """The write to send next and how many queued ops it stands for: consecutive metric ops go as one batch
        (up to MAX_BATCH values), so a busy run makes few store transactions."""
        head = self.queue[0]
        if head["op"] != "metrics" or self.one_by_one:
            return head, 1
        values, n = [], 0
        for op in self.queue:
            if op["op"] != "metrics" or len(values) + len(op["metrics"]) > MAX_BATCH:
                break
            values, n = values + op["metrics"], n + 1
        return {"op": "metrics", "metrics": values}, n

    def _loop(self) -> None:
        backoff = 0.25
        while True:
            with self.lock:
                while not self.queue and not self.closed:
                    self.lock.wait()
                if self.closed or self.fatal:
                    return
                op, n = self._next()
            try:
                send(self.client, self.run_id, op)
            except Exception as e:  # every store error is sorted below; none may kill the writer silently
                kind = verdict(e)
                with self.lock:
                    if kind == "fatal":
                        self.fatal = first_line(e)
                        self.lock.notify_all()
                        return
                    if kind == "retry":
                        self.outage = first_line(e)
                        self.lock.wait(backoff)
                        backoff = min(backoff * 2, self.max_backoff)
                        continue
                    if n > 1:  # the store refused a merged batch: send its ops one by one, to refuse only the bad one
                        self.one_by_one = n
                        continue
                    count_not_stored(self.queue, refused(op))
                    self.not_stored += refused(op)
            backoff = 0.25
            with self.lock:  # only this thread removes ops, so the n at the head are the ones just sent
                self.outage = None
                self.one_by_one = max(0, self.one_by_one - n)
                for _ in range(n):
                    self.queue.popleft()
                spooled = self.closed  # then close() returned this op too: the spool still needs its files
                self.lock.notify_all()
            if not spooled:
                sent(op)

    def drain(self, timeout: float) -> bool:
        """Wait until every queued op is stored (True), the store failed for good, or timeout passed (False)."""
        deadline = time.monotonic() + timeout
        with self.lock:
            while self.queue and not self.fatal and time.monotonic() < deadline:
                self.lock.wait(min(0.5, max(0.0, deadline - time.monotonic())))
            return not self.queue

    def close(self) -> list[Op]:
        """Stop the thread; return the ops not stored, oldest first."""
        with self.lock:
            self.closed = True
            self.lock.notify_all()
            return list(self.queue)


def refused(op: Op) -> int:
    """What a write the store refused for good counts in NOT_STORED_TAG: its metric values, and at least 1."""
    return max(1, len(op.get("metrics", ())))


def sent(op: Op) -> None:
    """Remove what a write stored or refused for good leaves behind: a model's saved folder (and the spool's, if empty)."""
    if op["op"] == "model":
        shutil.rmtree(op["path"], ignore_errors=True)
        remove_if_empty(Path(op["path"]).parent)


def count_not_stored(ops: list[Op], n: int) -> None:
    """Add n refused metric values to the run's end op, so that it ends FAILED with the count as a tag."""
    for op in ops:
        if op["op"] == "end":
            op["not_stored"] = op.get("not_stored", 0) + n


def spool_path(run_id: str, spool_dir: str | Path = SPOOL_DIR) -> Path:
    return Path(spool_dir) / f"{run_id}.jsonl"


def write_spool(path: Path, tracking_uri: str, run_id: str, ops: list[Op], checkpoint: str | None = None) -> None:
    """One header line (store, run, and where its checkpoint is: `sync` may run in another folder), then one op per
    line; written whole or not at all."""
    header = {"tracking_uri": tracking_uri, "run_id": run_id, **({"checkpoint": checkpoint} if checkpoint else {})}
    lines = [json.dumps(header)] + [json.dumps(op) for op in ops]
    write_whole(path, lambda partial: partial.write_text("\n".join(lines) + "\n"))


def replay(path: Path, tracking_uri: str | None = None) -> tuple[int, int, str]:
    """Send a spool file's ops to its store in order: (ops stored, ops left, status of the run now).

    The file is removed when every op is stored and rewritten with the rest otherwise. A run that
    something else closed meanwhile (e.g. `mlflow run` after the non-zero exit) is reopened first, so that its status
    says nothing final while the rest lands, and the spooled end op closes it with its true status.
    """
    header, *ops = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    client = MlflowClient(tracking_uri or header["tracking_uri"])
    run_id = header["run_id"]
    try:
        if client.get_run(run_id).info.status != "RUNNING":
            client.update_run(run_id, status="RUNNING")
    except Exception as e:  # the store is still away: keep the file as it is
        return 0, len(ops), f"not synced ({first_line(e)})"
    stored = 0
    for i, op in enumerate(ops):
        try:
            send(client, run_id, op)
        except Exception as e:
            if verdict(e) != "rejected":
                write_spool(path, header["tracking_uri"], run_id, ops[i:], header.get("checkpoint"))
                return stored, len(ops) - i, f"not synced ({first_line(e)})"
            count_not_stored(ops, refused(op))
        sent(op)
        stored += 1
    path.unlink(missing_ok=True)  # a second replay of it (sync by hand beside a sweep's retry) may have been first
    remove_if_empty(path.parent)
    return stored, 0, client.get_run(run_id).info.status
