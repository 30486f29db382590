"""A run's writes spooled while the store was away: where they are, and storing them as `sync` does."""
from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities import Run

from .checkpoint import checkpoint_path, remove
from .delivery import replay, spool_path
from .tracking import SPOOL_TAG


def pending_spool(run: Run) -> Path | None:
    """The spool file holding the run's unstored writes, here or where it trained (its `spool_file` tag); None if none."""
    run_id = run.info.run_id
    for path in dict.fromkeys([spool_path(run_id).resolve(), Path(run.data.tags.get(SPOOL_TAG, spool_path(run_id))).resolve()]):
        if path.is_file():
            return path
    return None


def store_spool(path: Path, tracking_uri: str | None = None) -> tuple[int, int, str]:
    """Replay a spool file (ops stored, ops left, the run's status now); a run it ends FINISHED loses its checkpoint
    (where it trained, as its spool says; else here), as a run whose end was stored at once does (nothing will resume it)."""
    try:
        header = json.loads(path.read_text().split("\n", 1)[0])
        stored, left, status = replay(path, tracking_uri)
    except FileNotFoundError:  # stored meanwhile by another replay (a sync by hand beside a sweep's retry)
        return 0, 0, "stored elsewhere meanwhile"
    if status == "FINISHED":
        remove(Path(header["checkpoint"]) if "checkpoint" in header else checkpoint_path(header["run_id"]))
    return stored, left, status
