"""Continue a stopped run from its last per-epoch checkpoint, into the same MLflow run and the same metric history."""
from __future__ import annotations

import shlex

import mlflow
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .checkpoint import checkpoint_path, load
from .config import PARAM_PREFIX, ConfigError
from .delivery import NOT_STORED_TAG
from .monitor import STEP_LOSS
from .orphans import unknown_fate
from .range_run import LR_FIND_TAG
from .spooled import pending_spool
from .stop import gone
from .tracking import PROCESS_TAG, MlflowTracker, store_unreadable, whereabouts


class ResumedTracker(MlflowTracker):
    """Reopens run_id instead of creating a run, and sends only the steps after those the run already stored
    (a resumed epoch replays, bit for bit on the same machine, the steps the killed process stored of it)."""

    def __init__(self, cfg, data_md5, run_id: str, **kwargs):
        super().__init__(cfg, data_md5, **kwargs)
        self.resumed_id, self.stored_through, self.first_summary = run_id, -1, True

    def _start_run(self) -> str:
        self.client.update_run(self.resumed_id, status="RUNNING")  # live again while it trains (sync closes it if we die)
        return self.resumed_id

    def _log_identity(self) -> None:
        """Params, config and datasets are stored already; note the step it had reached and who trains it now."""
        history = self.client.get_metric_history(self.run_id, STEP_LOSS)
        self.stored_through = max((m.step for m in history), default=-1)
        self.steps_logged = self.stored_through + 1  # a resume stopped before it passes them still has these
        for key, value in {**whereabouts(self.run_id), **self.extra_tags}.items():  # e.g. the sweep trial that resumes it
            self.client.set_tag(self.run_id, key, value)

    def on_metrics(self, rows):
        super().on_metrics([(step, m) for step, m in rows if step > self.stored_through])

    def on_epoch_end(self, epoch, metrics):
        # Only the first epoch trained here can have its summary stored already: the process was killed after sending
        # it and before the checkpoint. Sent again, each value would be a second point at that epoch.
        stored = self._stored_summary(epoch, metrics) if self.first_summary else {}
        self.first_summary = False
        missing = {key: value for key, value in metrics.items() if key not in stored}
        if missing:
            MlflowTracker.on_epoch_end(self, epoch, missing)
        self.final_values = [[k, m.value, m.timestamp, epoch] for k, m in stored.items()] + (self.final_values if missing else [])

    def _stored_summary(self, epoch: int, keys) -> dict:
        """{key: Metric} of the epoch's summary values the store already holds; none if it cannot say (away: the writer
        spools what it cannot send, and a value sent twice is a duplicate point, not a loss)."""
        stored = {}
        try:
            for key in keys:
                at = [m for m in self.client.get_metric_history(self.run_id, key) if m.step == epoch]
                if at:
                    stored[key] = at[-1]
        except MlflowException:
            return {}
        return stored


def store_client() -> MlflowClient:
    """A client of the store runs are read from; a one-line ConfigError where it is a SQLite file that does not exist
    (MLflow would make an empty store there)."""
    if why := store_unreadable(mlflow.get_tracking_uri()):
        raise ConfigError(why)
    return MlflowClient()


def recorded_run(client: MlflowClient, run_id: str):
    """The run, or a one-line ConfigError where the store has none by that id (a store that is away raises its error)."""
    try:
        return client.get_run(run_id)
    except MlflowException as e:
        if e.error_code not in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):  # the latter: no id at all ("", "../x")
            raise
        raise ConfigError(f"no run '{run_id}' in {client.tracking_uri}") from None


def recorded_training(client: MlflowClient, run_id: str, command: str):
    """recorded_run, refused in one line unless it is a training this project tracked (its config as params, not an
    LR range test): reproduce or resume would otherwise train some default config and compare it with anything."""
    run = recorded_run(client, run_id)
    if LR_FIND_TAG in run.data.tags or not any(k.startswith(PARAM_PREFIX) for k in run.data.params):
        what = "an LR range test (lr-find)" if LR_FIND_TAG in run.data.tags else f"a run without {PARAM_PREFIX}* params"
        raise ConfigError(f"run {run_id} is {what}, not a training: {command} takes the run of a `train`, a sweep cell or "
                          "a stress trial")
    return run


def resumable(client: MlflowClient, run_id: str):
    """The run and its checkpoint file, if it can be resumed here; else a one-line ConfigError saying why not."""
    run = recorded_training(client, run_id, "resume")
    process = run.data.tags.get(PROCESS_TAG, "")
    if spool := pending_spool(run):  # resumed first, a spool's replay would end the run again with its old count
        raise ConfigError(f"run {run_id} has writes spooled in {spool}; store them first with `python -m cookbook "
                          f"sync --spool-dir {shlex.quote(str(spool.parent))}`, then resume")
    if run.info.status == "FINISHED":
        raise ConfigError(f"run {run_id} finished; there is nothing to resume")
    if NOT_STORED_TAG in run.data.tags:  # resumed, it would end FINISHED around values the store never took
        raise ConfigError(f"run {run_id}: the store refused {run.data.tags[NOT_STORED_TAG]} of its metric values "
                          f"({NOT_STORED_TAG}); train it again instead")
    if run.info.status == "RUNNING" and not gone(process):
        why = unknown_fate(process)
        raise ConfigError(f"run {run_id} is RUNNING: " + (f"{why}; once it trains no more, `python -m cookbook sync --close "
                                                          f"{run_id}`, then resume" if why else f"its process {process} still trains"))
    path = checkpoint_path(run_id)
    if not path.is_file():
        raise ConfigError(f"run {run_id} has no checkpoint at {path} (it stopped before its first epoch ended, "
                          f"or trained in another folder: resume it there, or set COOKBOOK_CHECKPOINT_DIR and COOKBOOK_SPOOL_DIR to "
                          "that folder's, so that its spool is checked too); train it again instead")
    check_stored_through(client, run_id, load(path))
    return run, path


def check_stored_through(client: MlflowClient, run_id: str, state: dict) -> None:
    """The store must hold every step and the epoch summary up to the checkpoint: resumed, the run trains on after it,
    so what a killed process still had queued for the store (an outage) would be a hole. One-line ConfigError if not."""
    stored = len({m.step for m in client.get_metric_history(run_id, STEP_LOSS) if m.step < state["steps_run"]})
    summary = all(any(m.step == state["epoch"] for m in client.get_metric_history(run_id, key)) for key in state["final"])
    if stored < state["steps_run"] or not summary:
        raise ConfigError(f"run {run_id}: its checkpoint is after epoch {state['epoch']} (step {state['steps_run']}) but "
                          f"the store has {stored} steps{'' if summary else ' and not that epoch summary'} (the rest "
                          "was lost with the process); train it again instead")
