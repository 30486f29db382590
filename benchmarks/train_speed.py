"""Seconds per epoch: the seed's loop vs ours (untracked, MLflow-tracked, bf16, eager, nondeterministic), per config.

    python -m benchmarks.train_speed --configs no_tricks,batchnorm,layernorm,all_tricks --epochs 1 --repeats 3

Modes are interleaved within each repeat and their order rotates between repeats, so a machine that
slows down mid-run, or a mode that suffers from following another, biases no mode. The first --skip-epochs
epochs of every run (default: 1 when a run has more) hold one-off costs (CUDA context, graph capture, cuDNN
autotuning, Triton compiles): they are reported apart (first_epoch_s) and left out of the per-epoch statistics.
Prints one table (seconds/epoch min and median, samples/s, ratio to the reference, peak RSS, tracking
overhead: end to end, from creating the MLflow run to closing it, and inside the training loop) and writes it
as CSV and JSON after every config.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

import mlflow
import pandas as pd
import psutil
import torch

from benchmarks import usage_error
from benchmarks.reference import train_seed_loop
from cookbook.config import CONFIGS_DIR, ConfigError, load_config
from cookbook.data import load_mnist
from cookbook.hooks import Hook
from cookbook.tracking import MlflowTracker
from cookbook.train import EPOCH_LOSS, resolve_device, train

# Our loop's modes and the compute settings each changes (eager / nondet: what CUDA graphs and determinism buy or cost).
MODE_COMPUTE = {"ours": {}, "ours+mlflow": {}, "ours-bf16": {"precision": "bf16"}, "ours-eager": {"cuda_graphs": False},
                "ours-nondet": {"deterministic": False}, "ours-nchw": {"channels_last": False},
                "ours-fusednorm": {"fused_norm": True}}
MODES = ("reference", *MODE_COMPUTE)


class PeakRSS:
    """Highest resident set size of this process while the block runs (sampled every 20 ms)."""

    def __enter__(self):
        self.proc, self.peak, self.running = psutil.Process(), 0, True
        self.thread = threading.Thread(target=self._sample, daemon=True)
        self.thread.start()
        return self

    def _sample(self):
        while self.running:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.02)

    def __exit__(self, *exc):
        self.running = False
        self.thread.join()
        self.peak = max(self.peak, self.proc.memory_info().rss)


class EpochTimes(Hook):
    """Collects each epoch's training seconds and mean loss."""

    def __init__(self):
        self.seconds, self.losses = [], []

    def on_epoch_end(self, epoch, metrics):
        self.seconds.append(metrics["time/epoch_seconds"])
        self.losses.append(metrics[EPOCH_LOSS])


class LoopTimedHook(Hook):
    """Wraps a hook and adds up the time the training loop spends in it: on_metrics, the only call inside an epoch."""

    def __init__(self, inner: Hook):
        self.inner, self.seconds = inner, 0.0

    def on_start(self, info):
        self.inner.on_start(info)

    def on_metrics(self, rows):
        started = time.perf_counter()
        self.inner.on_metrics(rows)
        self.seconds += time.perf_counter() - started

    def on_epoch_end(self, epoch, metrics):
        self.inner.on_epoch_end(epoch, metrics)

    def on_end(self, result):
        self.inner.on_end(result)


def run_reference(cfg, epochs: int, device: str) -> tuple[list[float], list[float], float]:
    """The seed's loop with cfg's norm, warmup and clipping, under torch's default kernel settings (not whichever an
    earlier mode of ours switched on): (epoch seconds, epoch losses, hook seconds)."""
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = torch.backends.cudnn.benchmark = False
    times = EpochTimes()
    train_seed_loop(norm_type=cfg.model.norm, use_warmup=cfg.schedule.warmup_epochs > 0,
                    use_clipping=cfg.optim.max_norm is not None, max_norm=cfg.optim.max_norm or 1.0, epochs=epochs,
                    lr=cfg.optim.lr, batch_size=cfg.data.batch_size, data_dir=cfg.data.data_dir, device=device,
                    on_epoch=lambda e, s, loss: times.on_epoch_end(e, {"time/epoch_seconds": s, EPOCH_LOSS: loss}))
    return times.seconds, times.losses, 0.0


def run_ours(cfg, data, tracked: bool) -> tuple[list[float], list[float], float]:
    """Our loop, untracked or with the MLflow tracker `python -m cookbook train` uses (system metrics on):
    (epoch seconds, epoch losses, seconds the loop spent in the tracker)."""
    times = EpochTimes()
    if not tracked:
        train(cfg, data, [times])
        return times.seconds, times.losses, 0.0
    with MlflowTracker(cfg, data.md5, experiment="benchmark", run_name=f"bench-{cfg.name}") as tracker:
        timed = LoopTimedHook(tracker)
        train(cfg, data, [times, timed])
    return times.seconds, times.losses, timed.seconds


def measure(config: str, modes: list[str], epochs: int, repeats: int, device: str, data_dir: str) -> list[dict]:
    """Rows of raw timings: one per (mode, repeat, epoch)."""
    base = {"epochs": epochs, "device": device, "data": {"data_dir": data_dir}}
    cfgs = {m: load_config(config, CONFIGS_DIR, {**base, "compute": MODE_COMPUTE.get(m, {})}) for m in modes}
    data = load_mnist(data_dir)
    rows = []
    for repeat in range(repeats):
        for mode in modes[repeat % len(modes):] + modes[: repeat % len(modes)]:  # rotate: no mode always runs first
            cfg = cfgs[mode]
            started = time.perf_counter()  # the whole run: for ours+mlflow, from creating its run to closing it
            with PeakRSS() as rss:
                if mode == "reference":
                    seconds, losses, hook_s = run_reference(cfg, epochs, str(resolve_device(device)))
                else:
                    seconds, losses, hook_s = run_ours(cfg, data, tracked=mode == "ours+mlflow")
            run_s = time.perf_counter() - started
            for epoch, (s, loss) in enumerate(zip(seconds, losses), 1):
                rows.append({"config": config, "mode": mode, "repeat": repeat, "epoch": epoch, "seconds": s,
                             "train_loss": loss, "hook_seconds": hook_s / len(seconds), "run_seconds": run_s,
                             "peak_rss_gb": rss.peak / 2**30})
            print(f"  {config:<11} {mode:<12} repeat {repeat}: " + ", ".join(f"{s:.1f}s" for s in seconds), file=sys.stderr, flush=True)
    return rows


def summarise(raw: pd.DataFrame, n_train: int, skip_epochs: int = 0) -> pd.DataFrame:
    """One row per (config, mode): the first epoch apart, then min/median s/epoch over the later epochs, samples/s,
    ratio to the reference, peak RSS, tracking overhead end to end (whole runs) and inside the loop."""
    keys = ["config", "mode"]
    steady = raw[raw.epoch > skip_epochs]
    table = steady.groupby(keys, sort=False).agg(
        epochs=("seconds", "size"), s_per_epoch_min=("seconds", "min"), s_per_epoch_median=("seconds", "median"),
        train_loss_last=("train_loss", "last"), hook_s_per_epoch=("hook_seconds", "mean"), peak_rss_gb=("peak_rss_gb", "max"),
    ).reset_index()
    per_key = lambda column: table.set_index(keys).index.map(column)  # noqa: E731
    table["first_epoch_s"] = per_key(raw[raw.epoch == 1].groupby(keys).seconds.median())
    table["s_per_run_median"] = per_key(raw.drop_duplicates([*keys, "repeat"]).groupby(keys).run_seconds.median())
    table["samples_per_s"] = n_train / table.s_per_epoch_median
    ref = table[table["mode"] == "reference"].set_index("config").s_per_epoch_median
    table["ratio_to_reference"] = table.s_per_epoch_median / table.config.map(ref).astype(float)  # NaN without a reference
    ours = table.config.map(table[table["mode"] == "ours"].set_index("config").s_per_epoch_median).astype(float)
    table["vs_ours_pct"] = 100 * (table.s_per_epoch_median / ours - 1)  # eager: what graphs save; nondet: what determinism costs
    tracked = table["mode"] == "ours+mlflow"
    ours_run = table.config.map(table[table["mode"] == "ours"].set_index("config").s_per_run_median).astype(float)
    table["tracking_overhead_pct"] = None  # end to end: creating the run, logging, the end's flush and closing it
    table.loc[tracked, "tracking_overhead_pct"] = 100 * (table.s_per_run_median / ours_run - 1)[tracked]
    table.loc[tracked, "tracking_in_loop_pct"] = 100 * table.hook_s_per_epoch[tracked] / table.s_per_epoch_median[tracked]
    return table


def machine() -> dict:
    """What the numbers were measured on."""
    info = {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
            "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(), "cpu": platform.processor() or "unknown"}
    try:
        info["cpu"] = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments, --modes and --configs as lists; a bad one exits 2 in one line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.train_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--configs", default="no_tricks,batchnorm,layernorm,all_tricks")
    parser.add_argument("--modes", default="reference,ours,ours+mlflow,ours-bf16", help=f"comma list of {', '.join(MODES)}")
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run")
    parser.add_argument("--repeats", type=int, default=2, help="runs per mode (interleaved)")
    parser.add_argument("--skip-epochs", type=int, default=None,
                        help="first epochs of each run left out of the per-epoch statistics (default: 1 if --epochs > 1)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results", help="folder for train_speed-<device>.csv/.json")
    args = parser.parse_args(argv)
    modes = [m for m in args.modes.split(",") if m]
    if not modes or any(m not in MODES for m in modes):
        usage_error(f"modes={args.modes!r}; choose from {', '.join(MODES)}")
    configs = [c for c in args.configs.split(",") if c]
    if not configs:
        usage_error(f"configs={args.configs!r}: name at least one config")
    args.modes, args.configs = modes, configs
    if args.skip_epochs is None:
        args.skip_epochs = 1 if args.epochs > 1 else 0
    if not 0 <= args.skip_epochs < args.epochs:
        usage_error(f"skip_epochs={args.skip_epochs}: must be at least 0 and below --epochs ({args.epochs})")
    try:
        for c in args.configs:
            load_config(c, CONFIGS_DIR)
    except ConfigError as e:
        usage_error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    modes, configs = args.modes, args.configs
    if args.threads:
        torch.set_num_threads(args.threads)
    device = str(resolve_device(args.device))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"train_speed-{device.split(':')[0]}"
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        if "ours+mlflow" in modes and not os.environ.get("MLFLOW_TRACKING_URI"):
            mlflow.set_tracking_uri(f"sqlite:///{tmp}/mlflow.db")  # a throwaway store: timings, not results
        for config in configs:  # written after every config: a stopped benchmark keeps what it measured
            rows += measure(config, modes, args.epochs, args.repeats, args.device, args.data_dir)
            raw = pd.DataFrame(rows)
            table = summarise(raw, n_train=60000, skip_epochs=args.skip_epochs)
            table.to_csv(f"{stem}.csv", index=False)
            Path(f"{stem}.json").write_text(json.dumps({"machine": machine(), "args": vars(args), "summary": table.to_dict("records"),
                                                        "raw": raw.to_dict("records")}, indent=1, default=str))
    with pd.option_context("display.width", 200, "display.max_columns", 20):
        print(table.drop(columns=["hook_s_per_epoch"]).to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nmachine: {machine()}\nwritten: {stem}.csv, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
