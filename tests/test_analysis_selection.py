"""Which runs each report section compares, and how the analysis refuses bad input: every config shown, none ranked
on its survivors, one scale that covers the configs, one config per size sweep."""
import json

import mlflow
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.entities import RunTag
from test_analysis import make_run

from analysis import precision_effect, seed_table
from analysis.cli import main
from analysis.load import stress_reports
from analysis.lr import boundaries, latest_per_config, warmup_size
from analysis.sections import diverged
from analysis.select import with_scale
from cookbook import tracking as t
from experiments.stress_report import STRESS_REPORT, STRESS_RUN


def report(tmp_path, experiment: str) -> str:
    assert main(["--experiment", experiment, "--output", str(tmp_path), "--no-mlflow-log"]) == 0
    return (tmp_path / "report.md").read_text()


def test_every_config_has_a_row_and_none_is_ranked_on_its_survivors(tracking, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("survivors")
    for seed in (0, 1):
        make_run(client, exp, "no_tricks", seed, 0.3 + seed / 100)
        make_run(client, exp, "batchnorm", seed, float("nan"), diverged=True)  # every seed diverged
    for seed, final in ((0, 0.01), (1, float("nan")), (2, float("nan"))):
        make_run(client, exp, "all_tricks", seed, final, diverged=seed > 0)  # one lucky survivor
    text = report(tmp_path, "survivors")
    results = pd.read_csv(tmp_path / "results.csv").set_index("config")
    assert results.loc[["all_tricks", "batchnorm", "no_tricks"], "seeds"].tolist() == [3, 2, 2]
    assert results.loc[["all_tricks", "batchnorm", "no_tricks"], "diverged runs"].tolist() == [2, 2, 0]
    assert "**Lowest final loss:** no_tricks (0.3050)." in text
    assert "Not ranked, a seed diverged: all_tricks (2 of 3 seeds), batchnorm (2 of 2 seeds)." in text
    assert "4 diverged runs left out (see Diverged runs)." in text  # the loss curves' and grad norms' means


def test_one_longer_run_does_not_hide_the_other_configs_and_a_huge_seed_is_read(tracking, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("scales")
    for config in ("no_tricks", "batchnorm", "layernorm"):
        for seed in (0, 2**64 - 1):  # the largest seed a run may have: above int64
            make_run(client, exp, config, seed, 0.2)
    make_run(client, exp, "no_tricks", 5, 0.1, epochs=3)  # one run at a larger scale
    report(tmp_path, "scales")
    results = pd.read_csv(tmp_path / "results.csv")
    assert sorted(results.config) == ["batchnorm", "layernorm", "no_tricks"] and set(results.seeds) == {2}


def test_a_rerun_stress_study_is_reported_once():
    trials = with_scale(pd.DataFrame([{"config": "no_tricks", "stress": "s", "epochs": 2, "train_subset": 256.0,
                                       "test_subset": 100.0, "batch_size": 64, "precision": "fp32"}]))
    newest_first = [{"config": "no_tricks", "trials": 8, "largest_converged_lr": 0.3, "boundary_lr": 0.5, "pruning_saved": 0},
                    {"config": "no_tricks", "trials": 8, "largest_converged_lr": 0.03, "boundary_lr": 0.05, "pruning_saved": 0}]
    text = boundaries(trials, newest_first)
    assert "boundary 0.5;" in text and "boundary 0.05" not in text


def test_the_x100_table_from_a_stress_study_has_each_probes_step0_loss():
    """It was always n/a: the report kept no probe's initial loss (a report from before still reads n/a)."""
    from analysis.lr import x100_table
    probe = {"seed": 0, "converged": False, "diverged": True, "diverged_step": 3, "final_loss": None, "initial_loss": 2.31}
    older = {k: v for k, v in probe.items() if k != "initial_loss"}
    reports = [{"config": c, "base_lr": 1e-3, "x100": [x]} for c, x in (("no_tricks", probe), ("batchnorm", older))]
    runs = with_scale(pd.DataFrame([sized("no_tricks", 1.0, 10_000, 0.0, 1e-3, 0.3)]))
    rows, _ = x100_table(runs, reports, 0.5)
    assert rows.set_index("config")["step-0 loss"].fillna(-1).to_dict() == {"no_tricks": 2.31, "batchnorm": -1}


def sized(config: str, width: float, params: int, warmup: float, lr: float, loss: float, seed: int = 0) -> dict:
    return {"config": config, "seed": seed, "lr": lr, "width": width, "depth": 3, "warmup_epochs": warmup,
            "param_count": params, "final_loss": loss, "diverged": False, "stress": None, "start_time": 0,
            "overrides": "model.width,optim.lr,schedule.warmup_epochs", "epochs": 2, "train_subset": None,
            "test_subset": None, "batch_size": 128, "precision": "fp32"}


def test_a_diverged_cell_two_phases_trained_is_listed_once():
    """The grid and the size sweep both train (no_tricks, lr 0.1, width 1, seed 0): one cell, two runs, listed once."""
    grid = {**sized("no_tricks", 1.0, 10_000, 0.0, 0.1, float("nan")), "diverged": True, "run_id": "a", "run_name": "grid",
            "diverged_step": 3, "total_steps": 200}
    runs = [grid, {**grid, "run_id": "b", "run_name": "size", "start_time": 1}, {**grid, "run_id": "c", "run_name": "c", "seed": 1},
            {**grid, "run_id": "d", "lr": 0.01, "diverged": False}]
    section = diverged(with_scale(pd.DataFrame(runs)))
    assert section.text.startswith("2 of 3 cells diverged (no_tricks: 2; 3 runs, a cell that two phases trained listed once): ")
    table = section.tables["diverged_runs"]
    assert table.run.tolist() == ["grid", "c"] and table.runs.tolist() == [2, 1]


def test_warmup_is_not_judged_without_runs_both_with_and_without_it():
    runs = [sized("no_tricks", w, p, 0.0, lr, 0.2) for w, p in ((0.5, 10_000), (2.0, 100_000)) for lr in (1e-3, 1e-2)]
    assert "Warmup cannot be judged here: no size was run both with and without warmup." in warmup_size(
        with_scale(pd.DataFrame(runs))).text


def test_two_warmup_lengths_are_never_pooled():
    """1-epoch warmup flattens LR sensitivity, 3-epoch warmup does not: two rows and two verdicts, not one mean."""
    losses = {0.0: (0.1, 2.0), 1.0: (0.1, 0.12), 3.0: (0.1, 1.9)}  # final loss at LR 1e-3, 1e-2
    runs = [sized("no_tricks", w, p, warmup, lr, loss) for w, p in ((0.5, 10_000), (2.0, 100_000))
            for warmup, pair in losses.items() for lr, loss in zip((1e-3, 1e-2), pair)]
    section = warmup_size(with_scale(pd.DataFrame(runs)))
    assert set(section.tables["size_table"].warmup) == {"no warmup", "warmup 1 epochs", "warmup 3 epochs"}
    assert "With warmup 1 epochs: Warmup matters at **every size tried**" in section.text
    assert "With warmup 3 epochs: Within the sizes tried warmup never mattered" in section.text


def test_warmup_matters_where_no_warmup_failed_at_every_lr_and_warmup_learned():
    """Without warmup the large model diverged at every LR: that is no LR sensitivity of 0 (LR-robust), warmup mattered."""
    runs = [{**sized("no_tricks", w, p, warmup, lr, float("nan") if failed else loss), "diverged": failed}
            for w, p in ((0.5, 10_000), (2.0, 100_000)) for warmup in (0.0, 1.0) for lr, loss in ((1e-3, 0.1), (1e-2, 0.2))
            for failed in [p == 100_000 and warmup == 0.0]]
    section = warmup_size(with_scale(pd.DataFrame(runs)))
    row = section.tables["size_table"].set_index(["params", "warmup"]).loc[(100_000, "no warmup")]
    assert pd.isna(row.sensitivity) and row.note == "failed at every LR"
    assert "Warmup starts to matter at **100,000 parameters**" in section.text and "it holds at 100,000)" in section.text


def test_two_configs_of_equal_parameter_counts_are_never_pooled():
    """BatchNorm and GroupNorm nets of one width have the same parameter count: the section draws the config with the
    most size runs (layernorm, 2 seeds) and names the other, instead of averaging batchnorm's 0.05 into its rows."""
    runs = [sized(config, w, p, warmup, lr, loss, seed) for config, loss, seed in
            (("batchnorm", 0.05, 0), ("layernorm", 2.0, 0), ("layernorm", 2.0, 1))
            for w, p in ((0.5, 10_000), (2.0, 100_000)) for warmup in (0.0, 1.0) for lr in (1e-3, 1e-2)]
    section = warmup_size(with_scale(pd.DataFrame(runs)))
    table = section.tables["size_table"]
    assert "Config layernorm;" in section.text and "Size runs of batchnorm are not drawn" in section.text
    assert set(table["best final loss"]) == {2.0} and set(table.seeds) == {2}


def test_bad_output_and_missing_store_are_one_line_before_anything_is_read(tmp_path, monkeypatch, capsys):
    (tmp_path / "a_file").write_text("")
    missing = tmp_path / "nowhere" / "mlflow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{missing}")
    assert main(["--experiment", "x", "--output", str(tmp_path / "a_file" / "sub")]) == 2
    assert main(["--experiment", "x", "--output", str(tmp_path / "out")]) == 2
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "foo://bar")
    assert main(["--experiment", "x", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err[0] == f"error: --output {tmp_path / 'a_file' / 'sub'}: {tmp_path / 'a_file'} is a file, not a folder"
    assert err[1] == f"error: no tracking store at sqlite:///{missing}; point MLFLOW_TRACKING_URI at the store the runs are in"
    assert err[2].startswith("error: ") and len(err) == 3 and not missing.parent.exists()


def test_the_latest_stress_study_is_the_one_the_store_started_last(tracking):
    """stress_reports reads the store newest first, whatever order the runs were written in; latest_per_config keeps that."""
    client = MlflowClient()
    exp = client.create_experiment("studies")
    for started, boundary in ((2000, 0.5), (1000, 0.05)):  # the newer study written first
        run = client.create_run(exp, start_time=started, run_name=STRESS_RUN).info.run_id
        client.log_text(run, json.dumps([{"config": "no_tricks", "boundary_lr": boundary}]), STRESS_REPORT)
        client.set_terminated(run)
    assert latest_per_config(stress_reports("studies"))["no_tricks"]["boundary_lr"] == 0.5


@pytest.mark.parametrize("tool", ["analysis", "seed_table", "precision_effect"])
def test_every_reading_tool_refuses_a_store_that_is_missing_or_not_a_database(tool, tracking, tmp_path, monkeypatch, capsys):
    entry = {"analysis": main, "seed_table": seed_table.main, "precision_effect": precision_effect.main}[tool]
    argv = ["--experiment", "x"] + (["--output", str(tmp_path / "out")] if tool == "analysis" else [])
    missing, garbage = tmp_path / "typo.db", tmp_path / "garbage.db"
    garbage.write_text("not a database")
    for store in (missing, garbage):
        monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{store}")
        mlflow.set_tracking_uri(f"sqlite:///{store}")
        assert entry(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == f"error: no tracking store at sqlite:///{missing}; point MLFLOW_TRACKING_URI at the store the runs are in"
    assert err[-1].startswith("error: ") and "Traceback" not in "\n".join(err) and not missing.exists()


def test_runs_without_a_seed_tag_or_scale_params_are_left_out_in_one_line(tracking, tmp_path, capsys):
    """A finished run lacking its seed tag, or its config params (epochs, batch size), is left out with one warning line
    by every reading tool; where that leaves none, one error line and exit 2; never a traceback."""
    client = MlflowClient()
    exp = client.create_experiment("incomplete")
    for seed in (0, 1):
        make_run(client, exp, "no_tricks", seed, 0.2 + seed / 10)
    client.delete_tag(make_run(client, exp, "no_tricks", 2, 0.25), t.SEED_TAG)
    for in_exp in (exp, client.create_experiment("bare")):  # a run with its tags only: no config params
        bare = client.create_run(in_exp).info.run_id
        client.log_batch(bare, tags=[RunTag(t.CONFIG_TAG, "no_tricks"), RunTag(t.SEED_TAG, "3"), RunTag(t.OVERRIDES_TAG, "seed")])
        client.set_terminated(bare)
    assert "**Lowest final loss:** no_tricks (0.2500)." in report(tmp_path, "incomplete")
    assert seed_table.main(["--experiment", "incomplete"]) == 0 and precision_effect.main(["--experiment", "incomplete"]) == 2
    assert main(["--experiment", "bare", "--output", str(tmp_path / "bare")]) == 2
    err = capsys.readouterr().err.splitlines()
    warning = ("warning: left out 2 of 4 finished training runs of 'incomplete' (without the seed tag: 1, without param "
               "config.epochs: 1, without param config.data.batch_size: 1)")
    assert err.count(warning) == 3 and err[-1] == ("error: experiment 'bare' has no finished training run with a seed tag, "
                                                   "epochs and batch size (without param config.epochs: 1, without param "
                                                   "config.data.batch_size: 1)")


def test_grad_norm_cv_is_per_seed_then_averaged_as_in_the_results_table(tracking, tmp_path):
    """Two seeds alike but for scale (grad norms 1-1.5 and 10-15): each has the same CV, which pooling them would inflate."""
    client = MlflowClient()
    exp = client.create_experiment("cv")
    for seed, grad in ((0, 1.0), (1, 10.0)):
        make_run(client, exp, "no_tricks", seed, 0.2, steps=400, snapshot=False, grad=grad)
    text = report(tmp_path, "cv")
    cv = pd.read_csv(tmp_path / "results_values.csv").set_index("config").loc["no_tricks", "grad_norm_cv_mean"]
    assert cv == pytest.approx(pd.Series([1.0, 1.5] * 4).std() / 1.25) and f"CV {cv:.2f}" in text.split("## Gradient norms: ")[1]


def test_runs_without_step_metrics_say_so_instead_of_empty_sections(tracking, tmp_path):
    client = MlflowClient()
    exp = client.create_experiment("no_steps")
    for config in ("no_tricks", "all_tricks"):
        for seed in (0, 1):
            make_run(client, exp, config, seed, 0.2, steps=0, snapshot=False)  # epoch metrics only
    text = report(tmp_path, "no_steps")
    assert "- **Loss curves**: none of these 4 runs logged a per-step `train/loss`" in text
    assert "- **Gradient norms: no_tricks vs all_tricks**: none of these 4 runs logged a per-step `opt/grad_norm_preclip`" in text
    assert ": ." not in text and "## Results table" in text


def test_both_results_tables_count_the_seeds_run_and_the_values_say_how_many_are_in_the_mean(tracking, tmp_path):
    """results.csv said 2 seeds and results_values.csv 1 for the same config (one counted the diverged seed, one not)."""
    client = MlflowClient()
    exp = client.create_experiment("seeds")
    make_run(client, exp, "no_tricks", 0, 0.2)
    make_run(client, exp, "no_tricks", 1, float("nan"), diverged=True)
    assert main(["--experiment", "seeds", "--output", str(tmp_path), "--no-mlflow-log"]) == 0
    shown, values = (pd.read_csv(tmp_path / f"{name}.csv").set_index("config").loc["no_tricks"] for name in ("results", "results_values"))
    assert (shown["seeds"], values["seeds"], values["seeds_in_mean"]) == (2, 2, 1)


def test_runs_of_a_config_file_edited_between_them_are_not_pooled_as_more_seeds(tracking, tmp_path):
    """The overrides tag is relative to the file: runs made before no_tricks.yaml's LR was edited carry none either.
    The results table takes the settings of the config's latest run and says which runs it left out."""
    client = MlflowClient()
    exp = client.create_experiment("edited")
    for seed in (0, 1):
        make_run(client, exp, "no_tricks", seed, 0.5, lr=1e-3, overrides=[])
    for seed in (0, 1):
        make_run(client, exp, "no_tricks", seed, 0.1 + seed / 100, lr=3e-3, overrides=[])  # after the edit
    text = report(tmp_path, "edited")
    results = pd.read_csv(tmp_path / "results_values.csv").set_index("config")
    assert results.loc["no_tricks", "seeds"] == 2 and results.loc["no_tricks", "final_loss_mean"] == pytest.approx(0.105)
    assert "Left out, trained at other own settings than their config's latest run" in text
    assert "2 runs of no_tricks at lr 0.001 (latest: 0.003)" in text
    assert "Best: **no_tricks**.\n" in text  # the tuned comparison of one config: nobody to compare it with
    assert "the stress study's" not in text and not (tmp_path / "lr_x100.csv").exists()  # no stress study, no x100 run
