"""A sweep cell whose earlier run stopped after an epoch: found by its tags, trained on from its checkpoint."""
from __future__ import annotations

from mlflow import MlflowClient

from cookbook.config import ConfigError
from cookbook.resume import resumable
from experiments.storage import CELL_TAG, SWEEP_TAG


def stopped_run(client: MlflowClient, experiment: str, sweep: str, cell: str) -> str | None:
    """The latest run of this cell in this sweep that stopped unfinished and has a checkpoint here, if any."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return None
    unfinished = f"tags.{SWEEP_TAG} = '{sweep}' and tags.{CELL_TAG} = '{cell}' and attributes.status != 'FINISHED'"
    runs = client.search_runs([found.experiment_id], order_by=["attributes.start_time DESC"], filter_string=unfinished)
    for run in runs:
        try:
            resumable(client, run.info.run_id)
        except ConfigError:  # still running elsewhere, or no checkpoint: not this one
            continue
        return run.info.run_id
    return None
