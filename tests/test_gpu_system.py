"""Run tags for the device (which physical GPU) and MLflow's system metrics, GPU ones included where CUDA is."""
import os
import subprocess
import sys
import time

import pytest
import torch
from mlflow import MlflowClient

from conftest import WITH_ROOT
from cookbook.config import merge, validate
from cookbook.hooks import Hook
from cookbook.resources import visible_gpus
from cookbook.sampler import STOP_TIMEOUT
from cookbook.tracking import GPU_TAG, MlflowTracker
from cookbook.train import train

INTERVAL = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"  # MLflow's default, 10 s, outlasts these runs: nothing would be sampled


def run_tags(tracker: MlflowTracker) -> dict[str, str]:
    return MlflowClient().get_run(tracker.run_id).data.tags


def test_on_start_tags_the_physical_gpu_and_the_loops_own_tags(tracking, tiny_cfg, tiny_data, gpus):
    gpus(4, "0,1,2,7")
    with MlflowTracker(tiny_cfg, tiny_data.md5, experiment="tags", system_metrics=False) as tracker:
        tracker.on_start({"param_count": 10, "device": "cuda:3", "total_steps": 2, "tags": {"cuda.deterministic": "true"}})
    tags = run_tags(tracker)
    assert tags[GPU_TAG] == "Fake GPU 3 (CUDA_VISIBLE_DEVICES=7)" and tags["device"] == "cuda:3"
    assert tags["cuda.deterministic"] == "true" and tags["param_count"] == "10"
    with MlflowTracker(tiny_cfg, tiny_data.md5, experiment="tags", system_metrics=False) as tracker:
        tracker.on_start({"param_count": 10, "device": "cpu", "total_steps": 2})  # no GPU, no loop tags
    assert GPU_TAG not in run_tags(tracker) and run_tags(tracker)["device"] == "cpu"


def test_a_tracked_run_samples_system_metrics(tracking, tiny_cfg, tiny_data, monkeypatch):
    monkeypatch.setenv(INTERVAL, "0.1")
    with MlflowTracker(tiny_cfg, tiny_data.md5, experiment="system", log_model=False) as tracker:
        time.sleep(0.6)  # a few samples' worth of a run
    metrics = MlflowClient().get_run(tracker.run_id).data.metrics
    assert {"system/cpu_utilization_percentage", "system/system_memory_usage_megabytes"} <= set(metrics)


class Pause(Hook):
    """A second of wall time after each epoch, so that a tiny run outlasts a few 1 s samples."""

    def on_epoch_end(self, epoch, metrics):
        time.sleep(1.0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (MLflow's GPU monitor reads it through NVML)")
def test_a_cuda_run_has_gpu_system_metrics_and_the_gpu_tag(tracking, tiny_cfg, tiny_data, monkeypatch):
    monkeypatch.setenv(INTERVAL, "1")
    cfg = validate(merge(tiny_cfg, {"device": "cuda", "epochs": 3}))
    with MlflowTracker(cfg, tiny_data.md5, experiment="gpu", log_model=False) as tracker:
        train(cfg, tiny_data, [tracker, Pause()])
    run = MlflowClient().get_run(tracker.run_id)
    gpu_metrics = {k for k in run.data.metrics if k.startswith("system/gpu_")}
    assert {"system/gpu_0_utilization_percentage", "system/gpu_0_memory_usage_megabytes"} <= gpu_metrics, sorted(run.data.metrics)
    assert run.data.tags[GPU_TAG] == f"{torch.cuda.get_device_name(0)} (CUDA_VISIBLE_DEVICES={visible_gpus()[0]})"
    assert run.data.tags["device"] == "cuda" and run.info.status == "FINISHED"


AWAY = """
import sys, time
from mlflow import MlflowClient
from cookbook.config import Config
from cookbook.tracking import MlflowTracker
tracker = MlflowTracker(Config(name="tiny"), {}, experiment="away", log_model=False)
tracker.uri = "http://127.0.0.1:9"  # the run is made in the SQLite store; the sampler writes to a store that is away
start = time.monotonic()
with tracker:
    time.sleep(0.3)
print(time.monotonic() - start, MlflowClient().get_run(tracker.run_id).info.status)
"""


def test_the_end_of_a_run_does_not_wait_on_a_sampler_whose_store_is_away(tracking, tmp_path):
    """MLflow's sampler thread asks the store for the run after each sample; against a store that refuses connections it
    retries for minutes (MLflow's default retries), and its finish() joins that thread with no limit. In a process of
    its own: the sampler thread left retrying must end with it, not write into later tests."""
    env = {**os.environ, INTERVAL: "0.1", **WITH_ROOT}
    done = subprocess.run([sys.executable, "-c", AWAY], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    seconds, status = done.stdout.split()
    assert float(seconds) < STOP_TIMEOUT + 5 and status == "FINISHED", done.stderr[-2000:]
