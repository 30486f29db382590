"""`python -m analysis --experiment NAME [--output DIR]`: figures, tables and one report from what MLflow tracked.

Reads the experiment's finished training runs (and any stress study's report logged there), draws
what the runs allow, says what they do not, writes reports/<experiment>/ and logs it all to an
MLflow run named "analysis" in the experiment "analysis".
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import matplotlib.pyplot as plt
import mlflow

from analysis import layers, load, lr, report, sections
from analysis.load import AnalysisError
from analysis.select import with_scale
from cookbook.files import blocking_file

ANALYSIS_EXPERIMENT = "analysis"


def build_sections(experiment: str) -> tuple[list[sections.Section], dict[str, str]]:
    """Every section the runs allow, and a one-line reason for each one they do not."""
    runs = with_scale(load.training_runs(experiment))
    reports = load.stress_reports(experiment)
    steps = [("Results table", lambda: sections.results_table(runs)),
             ("Loss curves", lambda: sections.loss_curves(runs)),
             ("Gradient norms across layers", lambda: layers.layer_norms(runs)),
             ("Gradient norms: no_tricks vs all_tricks", lambda: sections.grad_norms(runs)),
             ("LR stress", lambda: lr.lr_stress(runs, reports, load.range_tests(experiment))),
             ("Tuned comparison (best LR per config)", lambda: lr.isolation(runs)),
             ("Warmup vs model size", lambda: lr.warmup_size(runs)),
             ("Diverged runs", lambda: sections.diverged(runs))]
    done, skipped = [], {}
    for name, build in steps:
        try:
            done.append(build())
        except sections.Skip as why:
            skipped[name] = str(why)
        except Exception as e:  # noqa: BLE001  (a section that breaks must not take the others with it)
            skipped[name] = f"could not be drawn: {type(e).__name__}: {e}"
    return done, skipped


def store_name() -> str:
    """The tracking store as the user gave it; a SQLite file below the working folder by its relative path."""
    uri = os.environ.get("MLFLOW_TRACKING_URI") or mlflow.get_tracking_uri()
    if uri.startswith("sqlite:///"):
        path = Path(uri.removeprefix("sqlite:///"))
        if path.is_absolute() and path.resolve().is_relative_to(Path.cwd().resolve()):
            return "sqlite:///" + path.resolve().relative_to(Path.cwd().resolve()).as_posix()
    return uri


def analyse(experiment: str, output: Path, log_to_mlflow: bool = True) -> Path:
    """Write the report folder for experiment; return the HTML report's path."""
    built, skipped = build_sections(experiment)
    source = f"Experiment `{experiment}` in `{store_name()}`; every number below is read from its tracked runs."
    written = report.save(built, output)
    md = report.markdown(f"Stability cookbook: {experiment}", built, skipped, source)
    (output / "report.md").write_text(md)
    html_path = output / "report.html"
    html_path.write_text(report.to_html(md, output))
    files = [*written, output / "report.md", html_path]
    report.keep_manifest(output, files)
    for s in built:
        for fig in s.figures.values():
            plt.close(fig)
    for name, why in skipped.items():
        print(f"not drawn: {name}: {why}", file=sys.stderr)
    if log_to_mlflow:
        log_report(experiment, files, built)
    return html_path


def log_report(experiment: str, files: list[Path], built: list[sections.Section]) -> None:
    """Log this report's files to an MLflow run (the `mlflow run` one if inside it) so the figures show in the UI."""
    if not os.environ.get("MLFLOW_RUN_ID"):
        mlflow.set_experiment(ANALYSIS_EXPERIMENT)
    with mlflow.start_run(run_name=f"analysis-{experiment}"):
        mlflow.set_tags({"analysed_experiment": experiment})
        for path in files:  # not the folder: whatever else it holds is not this report
            mlflow.log_artifact(str(path))
        for s in built:
            if "results" in s.tables:
                mlflow.log_table(s.tables["results"], "results_table.json")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m analysis", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="MLflow experiment holding the training runs")
    parser.add_argument("--output", default="", help="folder for the report (default reports/<experiment>)")
    parser.add_argument("--no-mlflow-log", action="store_true", help="do not log the report to an MLflow run")
    return parser


def check_inputs(output: Path) -> None:
    """Refuse, before reading anything, a report folder that cannot be one and a SQLite store that does not exist
    (MLflow would create an empty one there and report no experiment)."""
    check_output(output)
    load.check_store()


def check_output(output: Path) -> None:
    """Refuse a report folder that cannot be one (it, or a folder above it, is a file); experiments.study asks first."""
    blocker = blocking_file(output)
    if blocker is not None:
        raise AnalysisError(f"--output {output}: {blocker} is a file, not a folder")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output or f"reports/{args.experiment}")
    try:
        check_inputs(output)
        path = analyse(args.experiment, output, not args.no_mlflow_log)
    except load.READ_ERRORS as e:
        print(load.refusal(e), file=sys.stderr)
        return 2
    print(f"report: {path.resolve()}")
    return 0
