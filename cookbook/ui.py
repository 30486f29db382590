"""Links into the MLflow UI's model-training view, and the tag that marks an experiment as model training."""
from __future__ import annotations

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException

UI_ROOT = "http://127.0.0.1:5000"  # where `mlflow ui` serves by default
# MLflow 3.17's UI opens an experiment in its GenAI view (overview of traces and tokens, no runs) unless the URL or the
# sidebar switch (remembered by the browser, GenAI until clicked) asks for model training; it ignores EXPERIMENT_KIND_TAG.
TRAINING_VIEW = "workflowType=machine_learning"
CHARTS_TAB = "model-metrics"  # a run page's tab with one chart per metric
# Read by MLflow UIs that choose an experiment's view from the experiment (not 3.17's); set in case one opens the store.
EXPERIMENT_KIND_TAG, TRAINING_KIND = "mlflow.experimentKind", "custom_model_development"


def ui_url(experiment_id: str, run_id: str | None = None, tab: str | None = None, root: str = UI_ROOT) -> str:
    """The model-training view of an experiment's runs, of one run's page, or of one of its tabs."""
    path = "/".join(filter(None, [f"#/experiments/{experiment_id}/runs", run_id, tab]))
    return f"{root}/{path}?{TRAINING_VIEW}"


def mark_training(client: MlflowClient, run_id: str) -> None:
    """Tag the experiment that holds run_id as model training, unless it names its kind already."""
    try:
        experiment_id = client.get_run(run_id).info.experiment_id
        if EXPERIMENT_KIND_TAG not in client.get_experiment(experiment_id).tags:
            client.set_experiment_tag(experiment_id, EXPERIMENT_KIND_TAG, TRAINING_KIND)
    except MlflowException:
        pass  # the tag only steers a UI: never fail a training over it (workers tagging one new experiment may collide)
