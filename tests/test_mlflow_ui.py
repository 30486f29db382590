"""The MLflow UI on a sweep's runs: `mlflow server` on loopback, pages rendered by headless Chromium."""
import re
import shutil
import subprocess
import urllib.parse

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import DATA_DIR
from experiments.sweep import main as sweep
from mlflow_server import MlflowServer

CHROMIUM = shutil.which("chromium")


def rendered_text(url: str) -> str:
    """The page's text after its JavaScript ran (Chromium's --dump-dom), tags and styles removed."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--virtual-time-budget=30000", "--dump-dom", url]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<style.*?</style>", " ", dom, flags=re.S))
    return re.sub(r"\s+", " ", text)


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = MlflowServer(tmp_path).start()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(srv.url)
    yield srv.url
    mlflow.set_tracking_uri(None)
    srv.stop()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_sweep_runs_are_listed_and_a_metric_page_renders(server, tmp_path, mnist_dir):
    tiny = ["--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64", "--data-dir", str(DATA_DIR)]
    assert sweep(["run", "--configs", "no_tricks,all_tricks", "--seeds", "0", "--storage", str(tmp_path / "j.log"),
                  "--study", "ui", "--experiment", "ui-sweep", *tiny]) == 0
    client = MlflowClient()
    exp = client.get_experiment_by_name("ui-sweep").experiment_id
    child = next(r for r in client.search_runs([exp]) if r.data.tags.get("cell") == "all_tricks seed=0")
    runs_page = rendered_text(f"{server}/#/experiments/{exp}/runs")
    assert "ui-sweep" in runs_page and "3 matching runs" in runs_page  # the sweep's parent run and its 2 cells
    run_page = rendered_text(f"{server}/#/experiments/{exp}/runs/{child.info.run_id}")
    assert "all_tricks seed=0" in run_page and "test/acc" in run_page and "config.optim.lr" in run_page
    key, keys = urllib.parse.quote("train/loss", safe=""), urllib.parse.quote('["train/loss"]', safe="")
    metric = (f"{server}/#/metric/{key}?runs=[%22{child.info.run_id}%22]&metric=%22{key}%22&experiments=[%22{exp}%22]"
              f"&plot_metric_keys={keys}&plot_layout={{}}&x_axis=step&y_axis_scale=linear&line_smoothness=1"
              "&show_point=false&deselected_curves=[]&last_linear_y_axis_range=[]")
    metric_page = rendered_text(metric)
    assert "all_tricks seed=0 (train/loss)" in metric_page and "Latest Min Max" in metric_page
