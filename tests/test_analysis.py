"""The analysis on MLflow runs made here with known values: exact table numbers, every figure, bad inputs."""
import math

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from analysis.cli import main
from analysis.stats import layer_spread, lr_sensitivity, mean_ci95

SNAPSHOT = "step,param,numel,grad_norm,weight_norm\n" + "".join(
    f"{s},features.0.weight,288,{g},1\n{s},features.0.bias,32,0.1,1\n{s},classifier.weight,1280,{g * 4},1\n"
    f"{s},classifier.bias,10,0.1,1\n" for s, g in ((100, 0.5), (500, 0.25), (2000, 0.125)))


def make_run(client, exp_id, config, seed, final, lr=1e-3, width=1.0, warmup=0.0, diverged=False, steps=2100,
             name=None, params=100000, snapshot=True):
    """A finished run carrying what the tracker logs, with values chosen by the test."""
    run = client.create_run(exp_id, run_name=name or f"{config} seed={seed}").info.run_id
    tags = {"config": config, "seed": str(seed), "diverged": str(diverged).lower(), "param_count": str(params),
            "steps_run": str(steps), "total_steps": str(steps)}
    params_ = {"config.optim.lr": str(lr), "config.model.width": str(width), "config.model.depth": "3",
               "config.schedule.warmup_epochs": str(warmup), "config.optim.max_norm": "1.0" if config == "all_tricks" else "null",
               "config.model.norm": "none", "config.epochs": "2", "config.compute.precision": "fp32"}
    metrics = [Metric("epoch/train_loss", 2 * final, 0, 1), Metric("epoch/train_loss", final, 0, 2),
               Metric("test/loss", final + 0.01, 0, 2), Metric("test/acc", 0.9 + seed / 100, 0, 2),
               Metric("epoch/clip_fraction", 0.5, 0, 1), Metric("epoch/clip_fraction", 0.25, 0, 2)]
    metrics += [Metric("train/loss", 2.3 - s / 1000, 0, s) for s in range(0, steps, 50)]
    metrics += [Metric("opt/grad_norm_preclip", 1.0 + (s % 100) / 100, 0, s) for s in range(0, steps, 50)]
    client.log_batch(run, metrics=metrics, params=[Param(k, v) for k, v in params_.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    if snapshot:
        client.log_text(run, SNAPSHOT, "grad_norms/snapshots.csv")
    client.set_terminated(run)
    return run


@pytest.fixture
def known(tracking):
    client = MlflowClient()
    exp = client.create_experiment("known")
    for config, finals in (("no_tricks", (0.1, 0.3)), ("all_tricks", (0.04, 0.06))):
        for seed, final in enumerate(finals):
            make_run(client, exp, config, seed, final)
            for lr, loss in ((1e-2, 0.5), (1e-1, None)):  # an LR grid, the largest LR diverged
                make_run(client, exp, config, seed, loss if loss else float("nan"), lr=lr, diverged=loss is None,
                         name=f"{config} seed={seed} lr={lr:g}")
    for width, params in ((0.5, 25000), (2.0, 400000)):  # a warmup-vs-size sweep
        for warmup in (0.0, 1.0):
            for lr, loss in ((1e-3, 0.1), (1e-2, 0.3 if warmup else 1.5), (1e-1, 0.9 if warmup else None)):
                make_run(client, exp, "all_tricks", 0, loss if loss else float("nan"), lr=lr, width=width, warmup=warmup,
                         diverged=loss is None, params=params, name=f"all_tricks seed=0 lr={lr:g} width={width:g} "
                                                                      f"warmup_epochs={warmup:g}")
    return "known"


def test_stats_by_hand():
    mean, half = mean_ci95([0.1, 0.3])
    assert mean == pytest.approx(0.2) and half == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    assert lr_sensitivity([0.5, 0.2, float("inf")], math.log(10)) == pytest.approx((0.5 + 0.2 + math.log(10)) / 3 - 0.2)
    assert lr_sensitivity([3.0, 0.2], 2.0) == pytest.approx((2.0 + 0.2) / 2 - 0.2)  # capped at the loss at init
    assert layer_spread([0.5, 2.0]) == 4.0


def test_report_numbers_and_figures(known, tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["--experiment", known, "--output", str(out)]) == 0
    assert "report: " in capsys.readouterr().out
    table = pd.read_csv(out / "results.csv").set_index("config")
    assert table.loc["no_tricks", "final train loss"] == "0.200 ± 1.271"
    assert table.loc["no_tricks", "epoch-1 loss"] == "0.400 ± 2.541"
    assert table.loc["all_tricks", "final train loss"] == "0.050 ± 0.127"
    assert table.loc["all_tricks", "clipped steps"] == "0.375 ± 0.000"
    assert table.loc["no_tricks", "seed claims "] == "~0.15"
    spread = pd.read_csv(out / "layer_spread.csv").set_index("config")
    assert spread.loc["no_tricks", "100"] == 4.0  # classifier 4x features.0; norms and biases left out
    sens = pd.read_csv(out / "lr_sensitivity_values.csv")
    no_warm = sens[(sens.params == 400000) & (sens.warmup == "no warmup")].sensitivity.item()
    assert no_warm == pytest.approx((0.1 + 1.5 + math.log(10)) / 3 - 0.1)
    for png in ("loss_curves", "layer_grad_norms", "grad_norm_over_training", "lr_stress", "warmup_vs_size", "sensitivity_vs_size"):
        assert (out / f"{png}.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "**Lowest final loss:** all_tricks" in report and "Warmup starts to matter at **25,000 parameters**" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    isolation = pd.read_csv(out / "isolation.csv").set_index("config")
    assert isolation.loc["no_tricks", "best LR"] == 1e-3
    assert "diverged" in report  # the diverged runs are named
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("analysis").experiment_id])
    assert {a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id)} >= {"report.html", "loss_curves.png"}


def test_missing_experiment_and_no_finished_runs(tracking, tmp_path, capsys):
    assert main(["--experiment", "nope", "--output", str(tmp_path)]) == 2
    client = MlflowClient()
    exp = client.create_experiment("empty")
    client.create_run(exp)  # still running: nothing finished
    assert main(["--experiment", "empty", "--output", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: no experiment 'nope'") and errors[1] == "error: experiment 'empty' has no finished training runs"


def test_short_runs_draw_what_they_can(tracking, tmp_path, capsys):
    client = MlflowClient()
    exp = client.create_experiment("short")
    for seed in (0, 1):
        make_run(client, exp, "no_tricks", seed, 0.2 + seed / 10, steps=60, snapshot=False)
    assert main(["--experiment", "short", "--output", str(tmp_path), "--no-mlflow-log"]) == 0
    err = capsys.readouterr().err
    assert "not drawn: Gradient norms across layers: no run reached any of the snapshot steps" in err
    assert (tmp_path / "loss_curves.png").exists() and (tmp_path / "results.csv").exists()
    assert "## Not drawn" in (tmp_path / "report.md").read_text()
