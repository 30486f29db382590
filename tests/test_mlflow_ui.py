"""The MLflow UI pages the README and a training link to: `mlflow server` on loopback, headless Chromium."""
import re
import shutil
import subprocess

import mlflow
import pytest
from mlflow import MlflowClient

from conftest import DATA_DIR, ROOT, TINY_FLAGS
from cookbook.cli import main as cookbook
from cookbook.ui import EXPERIMENT_KIND_TAG, TRAINING_KIND, UI_ROOT
from experiments.sweep import main as sweep
from mlflow_server import MlflowServer

CHROMIUM = shutil.which("chromium")
GENAI_VIEW = ("Evaluation runs", "Token Usage")  # MLflow 3.17's GenAI view: its sidebar, its overview; not model training


def rendered(url: str) -> tuple[str, str]:
    """(DOM, text) of the page after its JavaScript ran (Chromium's --dump-dom); the text without tags and styles."""
    cmd = [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
           "--run-all-compositor-stages-before-draw",  # else a chart waits for a frame that says it is on screen
           "--virtual-time-budget=30000", "--dump-dom", url]
    dom = subprocess.run(cmd, capture_output=True, text=True, timeout=120).stdout
    text = re.sub(r"<[^>]+>", " ", re.sub(r"<style.*?</style>", " ", dom, flags=re.S))
    return dom, re.sub(r"\s+", " ", text)


@pytest.fixture
def server(tmp_path, monkeypatch):
    srv = MlflowServer(tmp_path).start()
    monkeypatch.chdir(tmp_path)  # the trainings' checkpoints land here, not in the project folder
    monkeypatch.setenv("MLFLOW_TRACKING_URI", srv.url)
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    mlflow.set_tracking_uri(srv.url)
    yield srv.url
    mlflow.set_tracking_uri(None)
    srv.stop()


@pytest.mark.slow
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (.ci/run installs it)")
def test_the_linked_pages_show_the_runs_and_a_chart(server, tmp_path, mnist_dir, capsys):
    client = MlflowClient()
    exp = client.create_experiment("ui-sweep")  # experiment 1, as in the README's link; untagged, as older code left it
    tiny = ["--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64", "--data-dir", str(DATA_DIR)]
    assert sweep(["run", "--configs", "no_tricks,all_tricks", "--seeds", "0", "--storage", str(tmp_path / "j.log"),
                  "--study", "ui", "--experiment", "ui-sweep", *tiny]) == 0
    capsys.readouterr()
    assert cookbook(["train", "--experiment", "ui-sweep", "--run-name", "ui-train", "--no-log-model", *TINY_FLAGS]) == 0
    printed = re.findall(r"http://\S+#/\S+", capsys.readouterr().out)  # the experiment's runs, the run, its charts
    readme = [u.replace(UI_ROOT, server) for u in re.findall(rf"<({re.escape(UI_ROOT)}/#/\S+)>", (ROOT / "README.md").read_text())]
    assert len(printed) == 3 and readme and set(readme) <= set(printed)
    assert client.get_experiment(exp).tags[EXPERIMENT_KIND_TAG] == TRAINING_KIND
    (_, runs), (_, run), (charts, charts_text) = (rendered(url) for url in printed)
    assert "ui-sweep" in runs and "4 matching runs" in runs  # the sweep's parent run, its 2 cells and the training
    assert "ui-train" in run and "test/acc" in run and "config.optim.lr" in run
    assert "js-plotly-plot" in charts and "ui-train (epoch/train_loss)" in charts_text  # the curve's legend, first chart
    assert not any(genai in page for genai in GENAI_VIEW for page in (runs, run, charts_text))
