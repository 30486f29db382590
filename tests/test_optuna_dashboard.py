"""optuna-dashboard on loopback against a tiny sweep's journal file and PostgreSQL: its HTTP API serves the trials and curves."""
import contextlib
import json
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import optuna
import pytest

from conftest import DATA_DIR
from experiments.storage import open_storage
from experiments.sweep import main
from postgres import free_port, postgres_server

TINY = ["--epochs", "2", "--train-subset", "256", "--test-subset", "100", "--batch-size", "64", "--data-dir", str(DATA_DIR)]


def get_json(url: str, seconds: float = 60) -> dict:
    """GET url until the server answers (it takes a moment to start), at most `seconds`."""
    deadline = time.time() + seconds
    while True:
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                return json.loads(response.read())
        except (urllib.error.URLError, ConnectionError):
            if time.time() > deadline:
                raise
            time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["journal", "postgresql"])
def test_dashboard_serves_the_sweeps_trials_and_intermediate_values(kind, mnist_dir, tracking, tmp_path):
    with postgres_server() if kind == "postgresql" else contextlib.nullcontext(str(tmp_path / "journal.log")) as storage:
        assert main(["run", "--configs", "no_tricks", "--seeds", "0,1", "--lrs", "1e-3", "--storage", storage, "--study", "dash",
                     *TINY]) == 0
        detail = served_study(storage, "dash")
        expected = optuna.load_study(study_name="dash", storage=open_storage(storage)).trials
    assert [(t["number"], t["state"]) for t in detail["trials"]] == [(t.number, "Complete") for t in expected]
    assert detail["has_intermediate_values"]
    for served, trial in zip(detail["trials"], expected):  # each cell's per-epoch training loss, as the plot draws it
        curve = {v["step"]: v["value"] for v in served["intermediate_values"]}
        assert curve == trial.intermediate_values and sorted(curve) == [1, 2]
        assert curve[2] == trial.user_attrs["epoch/train_loss"]
        assert [p["param_external_value"] for p in served["params"]] == [trial.params["cell"]]


def served_study(storage: str, name: str) -> dict:
    """Start `optuna-dashboard STORAGE` on a free loopback port and read the study's detail (its trials) from its API."""
    port = free_port()
    dashboard = Path(sys.executable).parent / "optuna-dashboard"  # the console script pip installed beside this python
    server = subprocess.Popen([str(dashboard), storage, "--host", "127.0.0.1", "--port", str(port), "--quiet"])
    try:
        studies = get_json(f"http://127.0.0.1:{port}/api/studies")["study_summaries"]
        (study,) = [s for s in studies if s["study_name"] == name]
        return get_json(f"http://127.0.0.1:{port}/api/studies/{study['study_id']}")
    finally:
        server.terminate()
        server.wait(timeout=30)
