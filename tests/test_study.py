"""The whole study at its smallest scale, end to end: every phase runs, the analysis writes its report."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from analysis.cli import ANALYSIS_EXPERIMENT
from conftest import ROOT, WITH_ROOT
from cookbook.config import CONFIGS_DIR, load_config
from cookbook.model import build_model, parameter_count
from experiments.study import PHASES, SCALES, X100_LR, default_stack, main, phase_commands, run_phases


def test_unknown_scale_and_phase_are_one_line(capsys):
    assert main(["--scale", "huge"]) == 2
    assert capsys.readouterr().err.strip() == f"error: scale='huge'; choose one of {', '.join(SCALES)}"
    assert main(["--phases", "seeds,warmup"]) == 2
    assert capsys.readouterr().err.strip() == f"error: phases='seeds,warmup'; choose from {', '.join(PHASES)}"


@pytest.mark.parametrize("argv,message", [(["--precision", "fp16"], "compute.precision='fp16' is not valid; choose one of: fp32, bf16"),
                                          (["--device", "tpu"], "device='tpu' must be one of auto, cpu, cuda, cuda:N, mps")])
def test_bad_run_flags_are_one_line_before_any_phase(argv, message, capsys, monkeypatch):
    monkeypatch.setattr("experiments.study.run_phases", lambda *a: pytest.fail("a phase ran"))
    assert main(argv) == 2 and capsys.readouterr().err.strip() == f"error: {message}"


def test_a_device_not_here_is_one_line_before_any_phase(capsys, monkeypatch):
    """It was the first phase's error, after the study had announced that phase."""
    monkeypatch.setattr("experiments.study.run_phases", lambda *a: pytest.fail("a phase ran"))
    assert main(["--device", "cuda:7"]) == 2
    assert capsys.readouterr().err.strip().startswith("error: device='cuda:7' is not available here")


def test_an_output_that_cannot_be_a_folder_is_one_line_before_any_phase(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("experiments.study.run_phases", lambda *a: pytest.fail("a phase ran"))
    (tmp_path / "a_file").write_text("")
    inside = tmp_path / "a_file" / "report"
    assert main(["--output", str(inside)]) == 2
    assert capsys.readouterr().err.strip() == f"error: --output {inside}: {tmp_path / 'a_file'} is a file, not a folder"


def test_a_phase_refusing_bad_input_ends_the_study_with_its_code_and_no_resume_line(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("experiments.study.run_child", lambda *a: 2)
    timings, code = run_phases({"seeds": [sys.executable, "-m", "experiments.sweep"]}, ["seeds"], {})
    assert code == 2 and "rerun the same command" not in capsys.readouterr().err


def test_run_flags_reach_every_phase():
    flags = ["--workers", "3", "--storage", "s.log", "--device", "cuda:1", "--precision", "bf16"]
    commands = phase_commands(SCALES["full"], "exp", flags, stack=5)
    assert list(commands) == list(PHASES)
    for phase, argv in commands.items():
        assert " ".join(flags) in " ".join(argv) and "--experiment exp" in " ".join(argv)
        assert ("--stack 5" in " ".join(argv)) == (phase != "stress")  # stress trials are one (LR, seed) each
        assert "--train-subset" not in argv and argv[argv.index("--epochs") + 1] == "5"  # full MNIST, 5 epochs


def test_full_scale_is_the_issue_grid():
    full = SCALES["full"]
    assert full.seeds == "0,1,2,3,4" and full.grid_seeds == "0,1,2" and full.stress_seeds == "0,1,2"
    lrs = {float(x) for x in full.grid_lrs.split(",")} | {1e-3, float(X100_LR)}  # the seed table and x100 phases add two
    assert lrs == {1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1} and full.stress_trials >= 16
    size_lrs = [float(x) for x in full.size_lrs.split(",")]
    assert len(size_lrs) >= 6 and min(size_lrs) == 3e-4 and max(size_lrs) == 1e-1
    counts = [parameter_count(build_model(load_config("no_tricks", CONFIGS_DIR, {"model": {"width": float(w)}}).model))
              for w in full.widths.split(",")]
    assert len(counts) >= 5 and max(counts) / min(counts) >= 20


def test_seeds_are_stacked_on_cuda_only():
    assert default_stack("cpu", "0,1,2,3,4") == 1 and default_stack("cuda", "0,1,2,3,4") == 5


@pytest.mark.slow
def test_smoke_study_runs_every_phase_and_reports(mnist_dir, tracking, tmp_path):
    out = tmp_path / "report"
    env = {**os.environ, **WITH_ROOT, "COOKBOOK_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
           "COOKBOOK_SPOOL_DIR": str(tmp_path / "spool")}  # the study runs in the project folder (./data): not these
    for name in ("smoke", ANALYSIS_EXPERIMENT):  # artifacts under tmp_path too
        MlflowClient().create_experiment(name, artifact_location=(tmp_path / "artifacts" / name).as_uri())
    cmd = [sys.executable, "-m", "experiments.study", "--scale", "smoke", "--experiment", "smoke", "--output", str(out),
           "--storage", str(tmp_path / "journal.log")]
    in_project = lambda: {p for d in ("mlruns", "checkpoints", "mlflow-spool")  # noqa: E731
                          for p in [ROOT / d, *(ROOT / d).glob("**/*")] if p.exists()}
    before = in_project()
    done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-2000:]
    assert in_project() == before and len(list((tmp_path / "artifacts" / "smoke").iterdir())) >= 40
    assert f"report: {out / 'report.html'}" in done.stdout
    report = (out / "report.md").read_text()
    for section in ("Results table", "LR stress", "Tuned comparison", "Warmup vs model size"):
        assert f"## {section}" in report
    assert "Gradient norms across layers**: no run reached any of the snapshot steps" in report  # 8 steps only
    client = MlflowClient()
    runs = client.search_runs([client.get_experiment_by_name("smoke").experiment_id])
    assert {r.data.tags.get("mlflow.runName") for r in runs} >= {"stress", "all_tricks seed=0", "no_tricks seed=0 lr=0.01"}


def processes_naming(text: str) -> list[str]:
    """Command lines of the live processes whose command line holds text."""
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            line = cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile
            continue
        if text in line:
            found.append(line)
    return found


@pytest.mark.slow
def test_sigterm_to_the_study_stops_the_phase_it_runs(mnist_dir, tracking, tmp_path):
    """SIGTERM (a scheduler's, a timeout's) reached only the study: the sweep it ran, and its worker, trained on."""
    env = {**os.environ, **WITH_ROOT, "COOKBOOK_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
           "COOKBOOK_SPOOL_DIR": str(tmp_path / "spool")}
    experiment = f"orphans-{tmp_path.name}"  # names this test's processes
    MlflowClient().create_experiment(experiment, artifact_location=(tmp_path / "artifacts").as_uri())
    study = subprocess.Popen([sys.executable, "-m", "experiments.study", "--scale", "smoke", "--phases", "seeds", "--no-analysis",
                              "--workers", "1", "--experiment", experiment, "--storage", str(tmp_path / "journal.log"), "--output",
                              str(tmp_path / "out")], env=env, cwd=ROOT, stderr=subprocess.PIPE, text=True)
    client, deadline = MlflowClient(), time.time() + 300
    exp_id = client.get_experiment_by_name(experiment).experiment_id
    while time.time() < deadline and study.poll() is None and not client.search_runs([exp_id], "tags.cell != ''"):
        time.sleep(0.2)  # until a cell trains
    study.send_signal(signal.SIGTERM)
    err = study.communicate(timeout=120)[1]
    assert study.returncode == 143, err[-2000:]
    assert err.strip().splitlines()[-1] == "stopped by SIGTERM; the phase running was stopped too; the same command resumes"
    assert processes_naming(experiment) == []
    assert {r.info.status for r in client.search_runs([exp_id])} <= {"FINISHED", "KILLED"}


def test_inside_mlflow_run_the_phases_nest_under_the_project_run_in_its_experiment(tracking, tmp_path, monkeypatch):
    """Under `mlflow run . -e study` every phase's parent run was a top-level run of experiment "study" (and
    `--experiment-name` decided nothing): an empty --experiment, the MLproject's default, is the project run's, and the
    sweep's and stress study's parent runs nest under the project run there."""
    from experiments import stress, sweep
    client = MlflowClient()
    project = client.create_run(client.create_experiment("chosen")).info.run_id
    seen = []
    monkeypatch.setattr("experiments.study.run_phases", lambda commands, phases, env: seen.append((commands, env)) or ({}, 0))
    monkeypatch.setenv("COOKBOOK_PARENT_RUN_ID", "left-in-the-shell")
    for experiment in ("", "other"):
        monkeypatch.setenv("MLFLOW_RUN_ID", project)  # MLflow's end_run (the study logs its timings) removes it
        assert main(["--experiment", experiment, "--phases", "seeds", "--no-analysis"]) == 0
    (nested, env), (elsewhere, other_env) = seen
    assert nested["seeds"][nested["seeds"].index("--experiment") + 1] == "chosen" and "MLFLOW_RUN_ID" not in env
    assert env["COOKBOOK_PARENT_RUN_ID"] == project and "COOKBOOK_PARENT_RUN_ID" not in other_env  # not across experiments
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("COOKBOOK_PARENT_RUN_ID", project)  # what a phase sees
    client.update_run(project, "RUNNING")  # as it is while its phases run (the study ended it here, timings logged)
    monkeypatch.setattr(sweep, "run_rounds", lambda *a: None)
    monkeypatch.setattr(stress, "run_workers", lambda *a: True)
    monkeypatch.setattr("experiments.study_figures.log_stress_history", lambda *a: None)
    tiny = ["--epochs", "1", "--train-subset", "256", "--test-subset", "100", "--experiment", "chosen"]
    sweep.main(["run", "--configs", "no_tricks", "--storage", str(tmp_path / "s.log"), *tiny])
    stress.main(["run", "--configs", "no_tricks", "--seeds", "0", "--n-trials", "2", "--storage", str(tmp_path / "t.log"), *tiny])
    parents = client.search_runs([client.get_experiment_by_name("chosen").experiment_id], "attributes.run_id != ''")
    assert sorted(r.info.run_name.split("-")[0] for r in parents if r.data.tags.get("mlflow.parentRunId") == project) == \
        ["stress", "sweep"]
    monkeypatch.setenv("COOKBOOK_PARENT_RUN_ID", client.create_run(client.create_experiment("elsewhere")).info.run_id)
    sweep.main(["run", "--configs", "batchnorm", "--storage", str(tmp_path / "s.log"), *tiny])  # a leftover value: not nested
    (alone,) = client.search_runs([client.get_experiment_by_name("chosen").experiment_id], "attributes.run_name LIKE 'sweep-%'",
                                  order_by=["attributes.start_time DESC"], max_results=1)
    assert "mlflow.parentRunId" not in alone.data.tags
    monkeypatch.setenv("MLFLOW_RUN_ID", "0" * 32)  # a stale one: one line before any phase (a traceback after them all)
    assert main(["--phases", "seeds", "--no-analysis"]) == 2
