"""RUNNING runs whose training process is gone (SIGKILL, power loss): `sync` ends them KILLED with the steps they stored."""
from __future__ import annotations

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

from .config import ConfigError
from .monitor import STEP_LOSS
from .stop import elsewhere, gone
from .tracking import PROCESS_TAG, STEPS_RUN_TAG, TOTAL_STEPS_TAG, store_unreadable


def unknown_fate(process: str) -> str | None:
    """Why this host cannot tell whether a RUNNING run's process still trains; None where it can."""
    if not process:
        return "its tags name no training process (made by an older version)"
    return f"it trains on another host ({process}): run sync there" if elsewhere(process) else None


def check_closable(uri: str, run_ids: list[str]) -> None:
    """Runs the user asks `sync` to close: each RUNNING in the store at uri, with a process this host cannot check (or a
    dead one); else a one-line ConfigError naming the run."""
    if not run_ids:  # a client would make a SQLite store that is not there
        return
    if store_unreadable(uri):
        raise ConfigError(f"--close {run_ids[0]}: no tracking store at {uri}")
    client = MlflowClient(uri)
    for run_id in run_ids:
        try:
            run = client.get_run(run_id)
        except MlflowException:
            raise ConfigError(f"--close {run_id}: no such run in {uri}") from None
        process = run.data.tags.get(PROCESS_TAG, "")
        deleted = run.info.lifecycle_stage == "deleted" or client.get_experiment(run.info.experiment_id).lifecycle_stage == "deleted"
        if deleted:  # sync lists only live runs: it would close nothing, and say nothing
            raise ConfigError(f"--close {run_id}: the run (or its experiment) is deleted; restore it first")
        if run.info.status != "RUNNING":
            raise ConfigError(f"--close {run_id}: the run is {run.info.status}, not RUNNING; there is nothing to close")
        if not unknown_fate(process) and not gone(process):
            raise ConfigError(f"--close {run_id}: its process {process} is alive on this host; stop it first")


def close_orphans(client: MlflowClient, skip: set[str] = frozenset(),
                  close: set[str] = frozenset()) -> tuple[list[tuple[str, int]], list[tuple[str, str]]]:
    """End KILLED every RUNNING run whose training process on this host is gone, and those in `close` (on the user's
    word), a training run tagged steps_run = the steps it stored: (run id, steps) for each; and (run id, why) for the
    RUNNING runs whose process this host cannot check, left RUNNING. Runs in `skip` (spooled) are left alone."""
    ids = [e.experiment_id for e in client.search_experiments()]
    running = client.search_runs(ids, "attributes.status = 'RUNNING'", max_results=10_000) if ids else []
    closed, unknown = [], []
    for run in running:
        run_id, process = run.info.run_id, run.data.tags.get(PROCESS_TAG, "")
        if run_id in skip:
            continue
        if run_id not in close and not gone(process):
            unknown += [(run_id, why)] if (why := unknown_fate(process)) else []
            continue
        steps = len(client.get_metric_history(run_id, STEP_LOSS))
        if steps or TOTAL_STEPS_TAG in run.data.tags:  # a training run; a sweep's parent run trains nothing
            client.set_tag(run_id, STEPS_RUN_TAG, str(steps))
        client.set_terminated(run_id, "KILLED")
        closed.append((run_id, steps))
    return closed, unknown
