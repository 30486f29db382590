"""Every config file in experiments/configs/ trains end to end (tiny slice, tracked)."""
import mlflow
import pytest
from mlflow import MlflowClient

from conftest import CONFIGS_DIR, TINY_FLAGS
from cookbook.cli import main
from cookbook.config import available_configs


@pytest.mark.parametrize("config", available_configs(CONFIGS_DIR))
def test_config_trains_and_tracks(config, mnist_dir, tracking):
    assert main(["train", "--config", config, *TINY_FLAGS, "--epochs", "1"]) == 0
    exp = mlflow.get_experiment_by_name("stability-cookbook")
    (run,) = MlflowClient().search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.data.tags["config"] == config
    assert run.data.metrics["test/acc"] > 0
