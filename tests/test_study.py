"""The whole study at its smallest scale, end to end: every phase runs, the analysis writes its report."""
import os
import subprocess
import sys

import pytest
from mlflow import MlflowClient

from conftest import ROOT
from experiments.study import SCALES, main


def test_unknown_scale_is_one_line(capsys):
    assert main(["--scale", "huge"]) == 2
    assert capsys.readouterr().err.strip() == f"error: scale='huge'; choose one of {', '.join(SCALES)}"


@pytest.mark.slow
def test_smoke_study_runs_every_phase_and_reports(mnist_dir, tracking, tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "experiments.study", "--scale", "smoke", "--experiment", "smoke", "--output", str(out),
           "--storage", str(tmp_path / "journal.log")]
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"report: {out / 'report.html'}" in done.stdout
    report = (out / "report.md").read_text()
    for section in ("Results table", "LR stress", "Tuned comparison", "Warmup vs model size"):
        assert f"## {section}" in report
    assert "Gradient norms across layers**: no run reached any of the snapshot steps" in report  # 8 steps only
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert {r.data.tags.get("mlflow.runName") for r in runs} >= {"stress", "all_tricks seed=0", "no_tricks seed=0 lr=0.01"}
