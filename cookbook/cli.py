"""Command line: `python -m cookbook train | lr-find | reproduce RUN_ID | resume RUN_ID | sync`."""
from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import time
import typing
from pathlib import Path

import yaml

from . import resources
from .checkpoint import checkpoint_path, remove
from .config import (
    CONFIGS_DIR,
    DEFAULT_EXPERIMENT,
    FLAG_KEYS,
    Config,
    ConfigError,
    file_config,
    from_params,
    load_config,
    to_yaml,
    unflatten,
)
from .data import DataError, load_mnist
from .hooks import Recorder
from .lr_find import END_LR, MAX_STEPS, START_LR, STEPS, UNUSED_KEYS
from .progress import Progress
from .stop import exit_code
from .train import EPOCH_GRAD_NORM, EPOCH_LOSS, TEST_ACC, TEST_LOSS, train
from .yaml_values import load_yaml


def parse_value(key: str, text: str):
    """A CLI value for a config key: as typed for a text key (a folder, a description: '#' is no comment there), else
    read as YAML 1.2, so '[100, 500]', 'none', 'true' and '1e-3' mean what they say."""
    if takes_text(key):
        return text
    try:
        return load_yaml(text)
    except yaml.YAMLError:
        raise ConfigError(f"cannot parse value {text!r}") from None


def takes_text(key: str) -> bool:
    """Whether a dotted config key is a str field (an unknown key is not: merge refuses it by name)."""
    *sections, leaf = key.split(".")
    node = Config()
    for name in sections:
        node = getattr(node, name, None)
    return dataclasses.is_dataclass(node) and typing.get_type_hints(type(node)).get(leaf) is str


def overrides_from(args: argparse.Namespace) -> dict:
    """Nested override dict from the flags that were given (non-empty) and --set KEY=VALUE pairs."""
    return unflatten(flat_overrides(args))


def flat_overrides(args: argparse.Namespace) -> dict:
    """{dotted key: value} of the flags that were given (non-empty) and --set KEY=VALUE pairs."""
    flat = {FLAG_KEYS[flag]: parse_value(FLAG_KEYS[flag], getattr(args, flag)) for flag in FLAG_KEYS
            if getattr(args, flag) not in (None, "")}
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            raise ConfigError(f"--set {item!r} must look like KEY=VALUE (e.g. monitor.layer_every=10)")
        flat[key] = parse_value(key, value)
    return flat


def cmd_train(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, args.configs_dir, overrides_from(args))
    if args.dry_run:
        print(to_yaml(cfg), end="")
        return 0
    resources.check(cfg)
    data = load_mnist(cfg.data.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    label = f"{cfg.name} s{cfg.seed}"
    started = time.time()
    if args.no_track:
        print_summary(label, train(cfg, data, [Progress(label)]), time.time() - started)
        return 0
    from .tracking import MlflowTracker  # here: the library trains without MLflow installed

    with MlflowTracker(cfg, data.md5, experiment=args.experiment, run_name=args.run_name,
                       system_metrics=not args.no_system_metrics, base=file_config(args.config, args.configs_dir),
                       log_model=not args.no_log_model) as tracker:
        result = train(cfg, data, [Progress(label), tracker], checkpoint=checkpoint_path(tracker.run_id))
    remove(checkpoint_path(tracker.run_id))  # only now: killed while its model was stored, the run resumes to its end
    print_summary(label, result, time.time() - started)
    print_where(tracker.run_id)
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    """Train a stopped run on from its last checkpoint, into the same run (same threads and device as it had)."""
    from .reproduce import match_recorded
    from .resume import ResumedTracker, resumable, store_client

    run, path = resumable(store_client(), args.run_id)
    cfg = match_recorded(from_params(run.data.params), run.data.tags)
    data = load_mnist(cfg.data.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    label, started = f"{cfg.name} s{cfg.seed}", time.time()
    with ResumedTracker(cfg, data.md5, args.run_id, system_metrics=not args.no_system_metrics,
                        log_model=not args.no_log_model) as tracker:
        print(f"resuming run {args.run_id} after step {tracker.stored_through} from {path}")
        result = train(cfg, data, [Progress(f"resume {label}"), tracker], checkpoint=path)
    remove(path)
    print_summary(label, result, time.time() - started)
    print_where(tracker.run_id)
    return 0


def print_summary(label: str, result, seconds: float) -> None:
    """Outcome and final metrics of a training, in two lines."""
    outcome = f"DIVERGED at step {result.diverged_step}" if result.diverged else "finished"
    final = result.final
    print(f"\n{label}: {outcome} after {result.steps_run}/{result.total_steps} steps in {seconds:.0f}s")
    if final:
        print(f"  final train loss {final[EPOCH_LOSS]:.4f} | test loss {final[TEST_LOSS]:.4f} | "
              f"test acc {final[TEST_ACC]:.4f} | mean pre-clip grad norm {final[EPOCH_GRAD_NORM]:.3f}")


def print_where(run_id: str) -> None:
    """Where the run is tracked and the MLflow UI pages that show it (a tracking server serves them itself)."""
    import mlflow

    from .ui import CHARTS_TAB, UI_ROOT, ui_url

    uri, exp = mlflow.get_tracking_uri(), mlflow.get_run(run_id).info.experiment_id
    served = uri.startswith(("http://", "https://"))
    print(f"  run {run_id} in experiment {exp} ({uri})")
    print("  open it in the MLflow UI:" if served else f"  open it: mlflow ui --backend-store-uri {shlex.quote(uri)}  then")
    root = uri.rstrip("/") if served else UI_ROOT
    for label, url in (("the experiment's runs", ui_url(exp, root=root)), ("this run", ui_url(exp, run_id, root=root)),
                       ("its metric charts", ui_url(exp, run_id, CHARTS_TAB, root=root))):
        print(f"    {label + ':':23s}{url}")


def cmd_reproduce(args: argparse.Namespace) -> int:
    from .reproduce import compare, match_recorded, outcome_verdict, stopped_after, through
    from .resume import recorded_training, store_client
    client = store_client()
    run = recorded_training(client, args.run_id, "reproduce")
    if run.info.status == "RUNNING":  # no steps_run tag yet: every stored value would read as a mismatch
        raise ConfigError(f"run {args.run_id} is still RUNNING: it trains, or its process died (`python -m cookbook sync` "
                          "ends such a run with the steps it stored); reproduce compares a run that has ended")
    cfg = match_recorded(from_params(run.data.params), run.data.tags)
    data = load_mnist(cfg.data.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    result = train(cfg, data, [Progress(f"reproduce {cfg.name} s{cfg.seed}"), recorder := Recorder()])
    tracked = {key: [(m.step, m.value) for m in client.get_metric_history(args.run_id, key)] for key in run.data.metrics}
    stopped = stopped_after(run.info.status, run.data.tags)  # pruned or killed: trained on, compared as far as it got
    rerun = recorder.history if stopped is None else through(recorder.history, stopped, result.total_steps // cfg.epochs)
    report = compare(tracked, rerun)
    report.append(("outcome (tags)", outcome_verdict(run.info.status, run.data.tags, result.diverged, result.steps_run)))
    for key, verdict in report:
        print(f"{key:48s} {verdict}")
    bad = [k for k, v in report if v.startswith("MISMATCH")]
    print(f"\n{len(report) - len(bad)}/{len(report)} metrics reproduced exactly" + (f"; differing: {', '.join(bad)}" if bad else ""))
    return 1 if bad else 0


def cmd_sync(args: argparse.Namespace) -> int:
    """Replay every spool file, then end KILLED the runs whose process died without a word; 1 if a spool is left."""
    import mlflow
    from mlflow import MlflowClient

    from .delivery import SPOOL_DIR
    from .orphans import check_closable, close_orphans
    from .spooled import store_spool
    from .tracking import store_unreadable

    uri = args.tracking_uri or mlflow.get_tracking_uri()
    check_closable(uri, args.close)  # before any spool is replayed
    spool_dir = args.spool_dir or SPOOL_DIR
    files = sorted(Path(spool_dir).glob("*.jsonl"))
    left = set()
    for path in files:
        stored, remaining, status = store_spool(path, args.tracking_uri)
        if remaining:
            left.add(path.stem)
        print(f"run {path.stem}: {stored} writes stored, {remaining} left; run {status}")
    print(f"{len(files) - len(left)}/{len(files)} spooled runs synced from {spool_dir}")
    # no store there: no runs to close, and none made
    closed, unknown = ([], []) if store_unreadable(uri) else close_orphans(MlflowClient(uri), skip=left, close=set(args.close))
    for run_id, steps in closed:
        why = "closed as asked" if run_id in args.close else "its process is gone"
        resume = f"; `python -m cookbook resume {run_id}` continues it" if checkpoint_path(run_id).is_file() else ""
        print(f"run {run_id}: {why}; ended KILLED with the {steps} steps it stored{resume}")
    for run_id, why in unknown:
        print(f"run {run_id}: left RUNNING: {why}; once it trains no more, `python -m cookbook sync --close {run_id}`")
    return 1 if left else 0


def add_config_flags(p: argparse.ArgumentParser, refused: tuple[str, ...] = ()) -> argparse.ArgumentParser:
    """--config, one flag per FLAG_KEYS entry (those setting a `refused` key say so), --set, --experiment and --no-track
    (train and lr-find)."""
    p.add_argument("--config", default="all_tricks", help="config name in experiments/configs/ or a path to a YAML file")
    p.add_argument("--configs-dir", type=Path, default=CONFIGS_DIR)
    for flag, key in FLAG_KEYS.items():
        p.add_argument(f"--{flag.replace('_', '-')}", dest=flag, default=None,
                       help=f"refused here: {key} is not used" if key.startswith(refused) else f"sets {key}")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="any config key, e.g. monitor.layer_every=10")
    p.add_argument("--experiment", default=DEFAULT_EXPERIMENT, help="MLflow experiment (ignored inside `mlflow run`)")
    p.add_argument("--no-track", action="store_true", help="run without MLflow")
    return p


def cmd_lr_find(args: argparse.Namespace) -> int:
    """Run the range test, print the suggestions, track it as one MLflow run (loss against LR, figure, tags)."""
    from .lr_find import lr_range_test

    if not 0 < args.start_lr < args.end_lr or not math.isfinite(args.end_lr / args.start_lr) or not 3 <= args.steps <= MAX_STEPS:
        raise ConfigError(f"need 0 < --start-lr < --end-lr (finite, their ratio too) and 3 <= --steps <= {MAX_STEPS:,}; got "
                          f"{args.start_lr}, {args.end_lr}, {args.steps}")
    unused = [key for key in flat_overrides(args) if key.startswith(UNUSED_KEYS)]
    if unused:
        raise ConfigError(f"lr-find sets each update's LR itself and runs --steps updates: {', '.join(unused)} would be "
                          f"ignored; drop it (unused here: {', '.join(k + '*' * k.endswith('.') for k in UNUSED_KEYS)})")
    cfg = load_config(args.config, args.configs_dir, overrides_from(args))
    resources.check(cfg)
    if not args.no_track:  # a store or experiment it cannot log to: refused now, not after the whole test
        from .range_run import check_experiment

        check_experiment(args.experiment)
    data = load_mnist(cfg.data.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    result = lr_range_test(cfg, data, args.start_lr, args.end_lr, args.steps)
    blowup = f"blew up at LR {result.blowup_lr:.3g}" if result.blowup_lr else "did not blow up"
    span = f"from LR {result.lrs[0]:.3g} to {result.lrs[-1]:.3g}" if result.lrs else "with a finite loss"
    print(f"{cfg.name}: {len(result.lrs)} steps {span}; the loss {blowup}")
    print(f"  suggested LR: steepest descent {result.steepest_lr:.3g}, minimum/10 {result.min_over_10_lr:.3g}")
    if not args.no_track:
        from .range_run import log_range_test

        print_where(log_range_test(cfg, data.md5, result, args.experiment))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cookbook", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    tr = add_config_flags(sub.add_parser("train", help="train one config and track it in MLflow"))
    tr.add_argument("--run-name", default=None)
    tr.add_argument("--dry-run", action="store_true", help="print the resolved config and exit")
    tr.set_defaults(func=cmd_train)
    lf = add_config_flags(sub.add_parser("lr-find", help="LR range test: one short run, LR raised exponentially each step"),
                          refused=UNUSED_KEYS)
    lf.add_argument("--start-lr", type=float, default=START_LR)
    lf.add_argument("--end-lr", type=float, default=END_LR)
    lf.add_argument("--steps", type=int, default=STEPS, help="most updates (it stops at the blow-up)")
    lf.set_defaults(func=cmd_lr_find)
    rp = sub.add_parser("reproduce", help="re-run a tracked run from its params and compare every metric exactly")
    rp.add_argument("run_id")
    rp.set_defaults(func=cmd_reproduce)
    rs = sub.add_parser("resume", help="train a stopped run on from its last per-epoch checkpoint, into the same run")
    rs.add_argument("run_id")
    for tracked in (tr, rs):
        tracked.add_argument("--no-system-metrics", action="store_true", help="do not sample CPU/memory into system/* metrics")
        tracked.add_argument("--no-log-model", action="store_true", help="do not log the trained network as an MLflow model")
    rs.set_defaults(func=cmd_resume)
    sy = sub.add_parser("sync", help="store what runs spooled while the store was away; end runs whose process died")
    sy.add_argument("--spool-dir", default=None, help="default: $COOKBOOK_SPOOL_DIR or ./mlflow-spool")
    sy.add_argument("--tracking-uri", default=None, help="default: the store each run was tracked in")
    sy.add_argument("--close", action="append", default=[], metavar="RUN_ID",
                    help="also end this RUNNING run KILLED, though this host cannot check its process (once it trains no more)")
    sy.set_defaults(func=cmd_sync)
    return parser


def main(argv: list[str] | None = None) -> int:
    # MLflow prints its own links when it tracks to a server; its experiment link opens the GenAI view, print_where's do not
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    args = build_parser().parse_args(argv)
    return exit_code(lambda: args.func(args), (ConfigError, DataError), stop_note(args))


def stop_note(args: argparse.Namespace) -> str:
    """What a signal leaves behind, said after "stopped by SIGTERM; "."""
    if args.func is cmd_sync:
        return "spool files not yet stored are kept: run sync again"
    if args.func is cmd_reproduce or getattr(args, "no_track", False):
        return "nothing was tracked"
    return "any run it had started ended KILLED, with every step trained before it"
