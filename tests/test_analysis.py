"""The analysis on MLflow runs made here with known values: exact table numbers, every figure, bad inputs."""
import json
import math
import re

import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import Metric, Param, RunTag

from analysis import load
from analysis.cli import main
from cookbook import tracking as t
from cookbook.range_run import LR_FIND_BLOWUP_TAG, LR_FIND_TAG
from cookbook.tracking import SNAPSHOT_ARTIFACT
from experiments.pruning import PRUNED_TAG

# per-layer pre-clip norms at the three snapshot steps: conv1 = g, fc = 4g (its spread is 4x), biases ignored
SNAPSHOT = "step,param,numel,grad_norm,weight_norm\n" + "".join(
    f"{s},features.0.weight,288,{g},1\n{s},features.0.bias,32,0.1,1\n{s},classifier.weight,1280,{g * 4},1\n"
    f"{s},classifier.bias,10,0.1,1\n" for s, g in ((100, 0.5), (500, 0.25), (2000, 0.125)))


def make_run(client, exp_id, config, seed, final, lr=1e-3, width=1.0, warmup=0.0, diverged=False, steps=2100,
             name=None, params=100000, snapshot=True, overrides=None, epochs=2, initial=2.3, snapshot_text=SNAPSHOT, grad=1.0):
    """A finished run carrying what the tracker logs, with values chosen by the test."""
    run = client.create_run(exp_id, run_name=name or f"{config} seed={seed}").info.run_id
    if overrides is None:  # what the tracker would write for a config whose own values are lr 1e-3, width 1, no warmup
        overrides = [k for k, changed in (("optim.lr", lr != 1e-3), ("model.width", width != 1.0),
                                          ("schedule.warmup_epochs", warmup != 0.0)) if changed]
    tags = {t.CONFIG_TAG: config, t.SEED_TAG: str(seed), t.DIVERGED_TAG: str(diverged).lower(), t.PARAM_COUNT_TAG: str(params),
            t.STEPS_RUN_TAG: str(steps), t.TOTAL_STEPS_TAG: str(steps), t.OVERRIDES_TAG: ",".join(["seed", *overrides])}
    if diverged:
        tags[t.DIVERGED_STEP_TAG] = "7"
    params_ = {"config.optim.lr": str(lr), "config.model.width": str(width), "config.model.depth": "3",
               "config.schedule.warmup_epochs": str(warmup), "config.optim.max_norm": "1.0" if config == "all_tricks" else "null",
               "config.model.norm": "none", "config.epochs": str(epochs), "config.compute.precision": "fp32",
               "config.data.batch_size": "128", "config.data.train_subset": "null", "config.data.test_subset": "null"}
    metrics = [Metric("epoch/train_loss", 2 * final, 0, 1), Metric("epoch/train_loss", final, 0, 2),
               Metric("test/loss", final + 0.01, 0, 2), Metric("test/acc", 0.9 + seed / 100, 0, 2),
               Metric("epoch/clip_fraction", 0.5, 0, 1), Metric("epoch/clip_fraction", 0.25, 0, 2)]
    metrics += [Metric("train/loss", initial - s / 1000, 0, s) for s in range(0, steps, 50)]
    metrics += [Metric("opt/grad_norm_preclip", grad * (1.0 + (s % 100) / 100), 0, s) for s in range(0, steps, 50)]
    client.log_batch(run, metrics=metrics, params=[Param(k, v) for k, v in params_.items()],
                     tags=[RunTag(k, v) for k, v in tags.items()])
    if snapshot:
        client.log_text(run, snapshot_text, SNAPSHOT_ARTIFACT)
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


def test_tuned_comparison_takes_no_lr_where_a_seed_diverged(tracking, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("tuned")
    for seed in (0, 1):
        make_run(client, exp, "no_tricks", seed, 0.3)
        make_run(client, exp, "no_tricks", seed, 0.4, lr=3e-3, name=f"no_tricks seed={seed} lr=0.003")
        make_run(client, exp, "no_tricks", seed, 0.05 if seed == 0 else float("nan"), lr=1e-2, diverged=seed == 1,
                 name=f"no_tricks seed={seed} lr=0.01")
    make_run(client, exp, "no_tricks", 2, 0.45, lr=3e-3, name="no_tricks seed=2 lr=0.003")  # a seed not at the best LR
    assert main(["--experiment", "tuned", "--output", str(tmp_path), "--no-mlflow-log"]) == 0
    isolation = pd.read_csv(tmp_path / "isolation.csv").set_index("config")
    assert isolation.loc["no_tricks", "best LR"] == 1e-3 and isolation.loc["no_tricks", "seeds"] == 2
    assert (isolation.loc["no_tricks", "LRs tried"], isolation.loc["no_tricks", "LRs where a seed diverged"]) == (3, 1)
    tuned = (tmp_path / "report.md").read_text().split("## Tuned comparison")[1]
    assert "fp32; seeds 0, 1.*" in tuned.split("\n\n")[1]  # the seeds compared, not every seed of the grid


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
    spread = pd.read_csv(out / "layer_spread_values.csv").set_index(["config", "step"])
    assert spread.loc[("no_tricks", 100), "max/min"] == 4.0  # fc 4x conv1; norms and biases left out
    assert spread.loc[("no_tricks", 100), "largest"] == "fc" and spread.loc[("no_tricks", 100), "smallest"] == "conv1"
    sens = pd.read_csv(out / "lr_sensitivity_values.csv")
    no_warm = sens[(sens.params == 400000) & (sens.warmup == "no warmup")].sensitivity.item()
    assert no_warm == pytest.approx((0.1 + 1.5 + math.log(10)) / 3 - 0.1)
    for png in ("loss_curves", "layer_grad_norms", "layer_spread", "grad_norm_over_training", "lr_stress", "warmup_vs_size",
                "sensitivity_vs_size"):
        assert (out / f"{png}.png").stat().st_size > 10_000
    report = (out / "report.md").read_text()
    assert "**Lowest final loss:** all_tricks" in report
    assert "Warmup matters at **every size tried**, 25,000 to 400,000 parameters" in report
    assert "data:image/png;base64," in (out / "report.html").read_text()
    isolation = pd.read_csv(out / "isolation.csv").set_index("config")
    assert isolation.loc["no_tricks", "best LR"] == 1e-3
    assert "## Diverged runs\n\n6 of 24 cells diverged (all_tricks: 4, no_tricks: 2)" in report
    assert set(pd.read_csv(out / "diverged_runs.csv").run) == {
        "no_tricks seed=0 lr=0.1", "no_tricks seed=1 lr=0.1", "all_tricks seed=0 lr=0.1", "all_tricks seed=1 lr=0.1",
        "all_tricks seed=0 lr=0.1 width=0.5 warmup_epochs=0", "all_tricks seed=0 lr=0.1 width=2 warmup_epochs=0"}
    assert "## Not drawn" not in report and "could not be drawn" not in report
    runs = MlflowClient().search_runs([MlflowClient().get_experiment_by_name("analysis").experiment_id])
    assert {a.path for a in MlflowClient().list_artifacts(runs[0].info.run_id)} >= {"report.html", "loss_curves.png"}


def test_a_report_into_an_earlier_reports_folder_keeps_and_logs_only_its_own_files(known, tmp_path):
    out = tmp_path / "report"
    assert main(["--experiment", known, "--output", str(out), "--no-mlflow-log"]) == 0
    assert (out / "lr_stress.png").is_file()
    (out / "notes.txt").write_text("the user's own")
    client = MlflowClient()
    for seed in (0, 1):  # an experiment with far fewer sections
        make_run(client, client.create_experiment("few") if seed == 0 else client.get_experiment_by_name("few").experiment_id,
                 "no_tricks", seed, 0.2, steps=60, snapshot=False)
    assert main(["--experiment", "few", "--output", str(out)]) == 0
    assert not (out / "lr_stress.png").exists() and (out / "notes.txt").read_text() == "the user's own"
    [run] = client.search_runs([client.get_experiment_by_name("analysis").experiment_id])
    logged = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "report.html" in logged and "notes.txt" not in logged and "lr_stress.png" not in logged
    assert logged - {"results_table.json"} == {p.name for p in out.iterdir() if p.name not in ("notes.txt", ".report-files")}


def test_per_layer_table_at_three_steps_and_size_table(known, tmp_path):
    out = tmp_path / "report"
    assert main(["--experiment", known, "--output", str(out), "--no-mlflow-log"]) == 0
    norms = pd.read_csv(out / "layer_grad_norms.csv").set_index(["config", "layer"])
    assert list(norms.columns) == ["step 100", "step 500", "step 2000"]
    assert norms.loc[("no_tricks", "conv1")].tolist() == ["0.5000 ± 0.0000", "0.2500 ± 0.0000", "0.1250 ± 0.0000"]
    assert norms.loc[("no_tricks", "fc")].tolist() == ["2.0000 ± 0.0000", "1.0000 ± 0.0000", "0.5000 ± 0.0000"]
    report = (out / "report.md").read_text()
    line = next(x for x in report.splitlines() if x.startswith("- **no_tricks**"))
    assert line.startswith("- **no_tricks**: not uniform at any step (step 100: 4.0 ± 0.0x (fc largest, conv1 smallest)")
    sizes = pd.read_csv(out / "size_table.csv").set_index(["params", "warmup"])
    assert sizes.loc[(400000, "no warmup"), "diverged runs"] == "1/3" and sizes.loc[(400000, "warmup"), "diverged runs"] == "0/3"
    assert sizes.loc[(400000, "no warmup"), "best LR"] == 1e-3 and sizes.loc[(25000, "warmup"), "best final loss"] == 0.1
    assert "Scale: 2 epochs on 60,000 training images (all), tested on 10,000, batch 128, fp32; seeds 0." in report


def test_x100_survivors_follow_one_rule(tracking, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("x100")
    outcomes = {"batchnorm": (0.2, 0.3), "layernorm": (0.2, 1.5), "no_tricks": (None, None)}  # 1.15 = 0.5 x 2.3 is the bar
    for config, finals in outcomes.items():
        for seed, final in enumerate(finals):
            make_run(client, exp, config, seed, 0.05)
            make_run(client, exp, config, seed, final if final else float("nan"), lr=0.1, diverged=final is None)
    make_run(client, exp, "wide", 0, 0.3, lr=0.01)  # a config given as a file elsewhere: no baseline, no config file here
    assert main(["--experiment", "x100", "--output", str(tmp_path), "--no-mlflow-log"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert ("**Survive LR x100:** batchnorm (2/2 seeds). In some seeds only: layernorm (1/2 seeds). "
            "Fail in every seed: no_tricks.") in report
    assert "final train loss < 0.5 x the loss of step 0" in report and "nan" not in report  # a diverged run's loss: n/a
    table = pd.read_csv(tmp_path / "lr_x100.csv").set_index(["config", "seed"])
    assert table.loc[("layernorm", 1), "outcome"] == "did not converge" and table.loc[("batchnorm", 1), "outcome"] == "converged"
    assert table.loc[("no_tricks", 0), "outcome"] == "diverged at step 7" and "wide" not in table.index.get_level_values(0)


def test_runs_are_classified_by_their_overrides_tag(tracking, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("tagged")
    make_run(client, exp, "no_tricks", 0, 0.1)
    make_run(client, exp, "no_tricks", 1, 0.3, name="no_tricks seed=1 lr=0.001")  # explicit LR equal to the config's own
    make_run(client, exp, "no_tricks", 0, 0.01, lr=0.1, name="no_tricks-s0")  # a plain command with --lr 0.1: not a baseline
    assert main(["--experiment", "tagged", "--output", str(tmp_path), "--no-mlflow-log"]) == 0
    table = pd.read_csv(tmp_path / "results.csv").set_index("config")
    assert table.loc["no_tricks", "seeds"] == 2 and table.loc["no_tricks", "final train loss"] == "0.200 ± 1.271"


def test_sweep_with_explicit_lrs_only_draws_without_traceback(tracking, tmp_path, capsys):
    client = MlflowClient()
    exp = client.create_experiment("explicit")
    for config in ("no_tricks", "batchnorm", "layernorm", "all_tricks"):
        for seed in (0, 1):
            make_run(client, exp, config, seed, 0.1 + seed / 10, name=f"{config} seed={seed} lr=0.001")
    assert main(["--experiment", "explicit", "--output", str(tmp_path), "--no-mlflow-log"]) == 0
    report = (tmp_path / "report.md").read_text()
    assert "## Results table" in report and "could not be drawn" not in report
    assert "- **Tuned comparison (best LR per config)**: no config was run at 2 or more learning rates" in report
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("n_runs", [0, 1])
def test_every_section_on_empty_and_one_run(tracking, n_runs, monkeypatch):
    from analysis import cli, load

    client = MlflowClient()
    exp = client.create_experiment("one")
    make_run(client, exp, "no_tricks", 0, 0.1)
    runs = load.training_runs("one")
    monkeypatch.setattr(load, "training_runs", lambda _: runs.iloc[:n_runs])
    built, skipped = cli.build_sections("one")
    assert not [why for why in skipped.values() if why.startswith("could not be drawn")], skipped
    assert {s.title for s in built} | set(skipped) >= {"Results table", "LR stress", "Warmup vs model size"}


def test_report_names_the_store_as_given(tracking, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/mlflow.db")  # absolute, below the working folder
    client = MlflowClient()
    make_run(client, client.create_experiment("where"), "no_tricks", 0, 0.1)
    assert main(["--experiment", "where", "--output", "out", "--no-mlflow-log"]) == 0
    report = (tmp_path / "out" / "report.md").read_text()
    assert "Experiment `where` in `sqlite:///mlflow.db`" in report and str(tmp_path) not in report


def test_missing_experiment_and_no_finished_runs(tracking, tmp_path, capsys):
    client = MlflowClient()
    exp = client.create_experiment("empty")
    client.create_run(exp)  # still running: nothing finished
    pruned = client.create_experiment("pruned")
    for seed in (0, 1):  # finished, but stopped by the pruner: no final result either
        client.set_tag(make_run(client, pruned, "no_tricks", seed, 0.2), PRUNED_TAG, "true")
    deleted = client.create_experiment("deleted")
    make_run(client, deleted, "no_tricks", 0, 0.2)
    client.delete_experiment(deleted)  # MLflow still finds it by name, runs and all
    for experiment in ("nope", "empty", "pruned", "deleted"):
        assert main(["--experiment", experiment, "--output", str(tmp_path)]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors[0].startswith("error: no experiment 'nope'")
    assert errors[1:3] == [f"error: experiment '{e}' has no finished training runs (a run the pruner stopped has no final result)"
                           for e in ("empty", "pruned")]
    assert errors[3] == (f"error: experiment 'deleted' is deleted in {tracking}; restore it first "
                         f"(`mlflow experiments restore --experiment-id {deleted}`)")


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


def test_seed_table_prints_the_reports_results_section(known, capsys):
    from analysis.seed_table import main as seed_table

    assert seed_table(["--experiment", known]) == 0
    out = capsys.readouterr().out
    assert "**Lowest final loss:** all_tricks (0.0500)" in out
    assert re.search(r"^\| no_tricks +\| +2 \| .*\| 0\.200 ± 1\.271 +\|", out, re.M)  # the same numbers as results.csv
    assert seed_table(["--experiment", "nope"]) == 2
    assert capsys.readouterr().err.startswith("error: no experiment 'nope' in sqlite:///")


def test_precision_effect_without_precision_pairs_is_one_line(known, capsys):
    from analysis.precision_effect import main as precision_effect

    assert precision_effect(["--experiment", known]) == 2  # fp32 runs only
    assert capsys.readouterr().err.strip() == "error: no config in 'known' has a seed trained in both fp32 and bf16 at one setting"


def test_range_test_blow_up_beside_the_stress_boundary(tracking, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("lrfind")
    make_run(client, exp, "no_tricks", 0, 0.1)
    client.set_tag(make_run(client, exp, "no_tricks", 1, 0.9), PRUNED_TAG, "true")  # stopped by a pruner: not a result
    blowups = {"no_tricks": "0.05", "batchnorm": "2.0", "layernorm": "none", "all_tricks": "0.1"}
    tests = {}
    for config, blowup in blowups.items():
        tests[config] = client.create_run(exp, run_name=f"lr-find {config}").info.run_id
        client.log_batch(tests[config], params=[Param("config.data.train_subset", "256"), Param("config.data.batch_size", "32")],
                         tags=[RunTag(LR_FIND_TAG, config), RunTag(LR_FIND_BLOWUP_TAG, blowup)])
        client.set_terminated(tests[config])
    common = {"trials": 10, "x100": [], "pruning_saved": 0.0}
    reports = [{"config": "no_tricks", "boundary_lr": 0.1, "boundary_lr_90ci": [0.04, 0.2], "largest_converged_lr": 0.08,
                "smallest_failed_lr": 0.12, "lr_find_run_id": tests["no_tricks"], **common},
               {"config": "batchnorm", "boundary_lr": 0.5, "boundary_lr_90ci": [0.25, 1.0], "largest_converged_lr": 3.4567e-4, **common},
               {"config": "layernorm", "largest_converged_lr": 0.3, "smallest_failed_lr": 0.6, **common},
               {"config": "all_tricks", "largest_converged_lr": 0.3, "smallest_failed_lr": 0.6, **common}]
    parent = client.create_run(exp, run_name="stress").info.run_id
    client.log_text(parent, json.dumps(reports), "stress_report.json")
    client.set_terminated(parent)
    assert main(["--experiment", "lrfind", "--output", str(tmp_path), "--no-mlflow-log"]) == 0
    table = pd.read_csv(tmp_path / "range_test_vs_boundary.csv").set_index("config")
    assert table.loc["no_tricks", "blow-up lies"] == "inside the boundary's 90% interval"
    assert table.loc["no_tricks", "boundary / blow-up"] == 2.0 and table.loc["no_tricks", "study range from the test"]
    assert table.loc["batchnorm", "blow-up lies"] == "above the boundary's 90% interval: 2x over its high end"
    assert table.loc["layernorm", "blow-up lies"] == "the range test never blew up"
    assert table.loc["all_tricks", "blow-up lies"] == "below the bracket (largest converged, smallest failed): 3x under its low end"
    assert table.loc["all_tricks", "range test on"] == "256 images, batch 32"
    assert table.loc["batchnorm", "largest converged"] == 3.457e-4  # 4 significant digits, not 4 decimals
    assert "In 1 of 4 configs its blow-up LR" in (text := (tmp_path / "report.md").read_text())
    assert "(without a fitted boundary: its bracket); in 1 it never blew up, so it said nothing" in text
    assert list(load.training_runs("lrfind").seed) == [0]
