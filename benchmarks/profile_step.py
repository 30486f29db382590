"""Where a stacked training step's device time goes: torch's profiler over K members' eager steps, by op.

    python -m benchmarks.profile_step --device cuda --members 64 --precision bf16 --steps 30

One untimed stacked run first (kernel compiles, cuDNN set-up), then one run of --steps full batches profiled, with
the CUDA graph off so that every kernel is seen (a graph replays the same kernels without the launch gaps). Each op's
self time (device time on CUDA, CPU time elsewhere) per training step, largest first, and its share of the total; the
test pass is one batch, a few percent of the total at most. On CUDA also each kernel's device time (every kernel,
those no op is credited with too). Written to OUT/profile_step-DEVICE-PRECISION-kK-{ops,kernels}.csv.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

import pandas as pd
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from benchmarks import usage_error
from benchmarks.train_speed import CONFIGS_DIR, machine
from cookbook.config import TRAIN_SIZE, ConfigError, load_config
from cookbook.data import load_mnist
from cookbook.stacked import conv_kind, train_stacked
from cookbook.train import resolve_device


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments; a bad one exits 2 in one line, before anything runs."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.profile_step", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="batchnorm")
    parser.add_argument("--members", type=int, default=64, help="K seeds trained as one stacked model")
    parser.add_argument("--steps", type=int, default=30, help="full batches profiled")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--stacked-conv", default="auto", help="compute.stacked_conv, as in training")
    parser.add_argument("--fused-norm", action="store_true", help="compute.fused_norm, as in training")
    parser.add_argument("--rows", type=int, default=25, help="ops printed (all are written)")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    if args.members < 1 or args.steps < 1 or args.rows < 1:
        usage_error(f"--members {args.members}, --steps {args.steps} and --rows {args.rows} must each be at least 1")
    try:
        run_config(args)
    except ConfigError as e:
        usage_error(str(e))
    return args


def run_config(args: argparse.Namespace):
    """One epoch of --steps full batches, a one-batch test pass, eager steps."""
    compute = {"precision": args.precision, "stacked_conv": args.stacked_conv, "fused_norm": args.fused_norm,
               "cuda_graphs": False}
    cfg = load_config(args.config, CONFIGS_DIR, {"device": args.device, "epochs": 1, "data": {"data_dir": args.data_dir},
                                                 "compute": compute})
    batch = cfg.data.batch_size
    if args.steps * batch > TRAIN_SIZE:
        raise ConfigError(f"--steps {args.steps} x batch {batch} is more than the {TRAIN_SIZE:,} training images")
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, train_subset=args.steps * batch, test_subset=batch))


def by_name(events, steps: int, on_device: bool, kind: DeviceType) -> pd.DataFrame:
    """Self time per step (ms) of each op (kind CPU) or kernel (CUDA), calls per step and share, largest first."""
    rows = [{"name": e.key, "ms_per_step": (e.self_device_time_total if on_device else e.self_cpu_time_total) / 1e3 / steps,
             "calls_per_step": e.count / steps} for e in events if e.device_type == kind]
    table = pd.DataFrame(rows, columns=["name", "ms_per_step", "calls_per_step"])
    table = table[table.ms_per_step > 0].sort_values("ms_per_step", ascending=False, ignore_index=True)
    return table.assign(share=table.ms_per_step / table.ms_per_step.sum())


def show(table: pd.DataFrame, what: str, rows: int) -> None:
    print(f"{what}: {table.ms_per_step.sum():.3g} ms per step")
    print(table.head(rows).to_string(float_format=lambda v: f"{v:.3g}", formatters={"name": lambda n: n[:90]}) + "\n")


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg = run_config(args)
    device = resolve_device(args.device)
    data = load_mnist(args.data_dir, cfg.data.train_subset, cfg.data.test_subset)
    cfgs = [dataclasses.replace(cfg, seed=s) for s in range(args.members)]
    train_stacked(cfgs, data, [[] for _ in cfgs])  # warm-up, not profiled
    on_device = device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_device else [])) as prof:
        train_stacked(cfgs, data, [[] for _ in cfgs])
    events = prof.key_averages()
    ops = by_name(events, args.steps, on_device, DeviceType.CPU)  # on CUDA: the device time of the kernels each op launched
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    fused = "-fusednorm" if args.fused_norm and cfg.model.norm != "none" else ""
    stem = out / f"profile_step-{device.type}-{args.precision}-k{args.members}{fused}"
    ops.to_csv(f"{stem}-ops.csv", index=False)
    show(ops, f"ops, self {'device' if on_device else 'CPU'} time", args.rows)
    if on_device:  # every kernel, also those no op is credited with (Triton's launches)
        kernels = by_name(events, args.steps, on_device, DeviceType.CUDA)
        kernels.to_csv(f"{stem}-kernels.csv", index=False)
        show(kernels, "kernels", args.rows)
    conv = conv_kind(cfg.compute.stacked_conv, device)
    print(f"K={args.members}, {args.precision}, {conv} convs, fused_norm {str(args.fused_norm).lower()}\n"
          f"machine: {machine()}\nwritten: {stem}-*.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
