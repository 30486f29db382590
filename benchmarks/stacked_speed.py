"""Runs per hour: K seeds as K separate runs vs one stacked (vectorised) run, for K = 1, 2, 4, 8.

    python -m benchmarks.stacked_speed --config batchnorm --ks 1,2,4,8 --train-subset 12800 --device auto
    python -m benchmarks.stacked_speed --device cuda --ks 1,4,16,64,128 --train-subset 60000 --test-subset 10000 \
        --epochs 5 --separate-up-to 4 --precision bf16 --stacked-conv grouped

A "run" is --epochs epochs over --train-subset images, each followed by the test pass on --test-subset,
everything a run does included (model, optimizer, CUDA graph capture). Separate runs are timed for K up to
--separate-up-to; above it the separate column is K x the K=1 time (runs one after another add up).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks import usage_error
from benchmarks.train_speed import CONFIGS_DIR, machine
from cookbook.config import ConfigError, load_config
from cookbook.data import load_mnist
from cookbook.stacked import conv_kind, train_stacked
from cookbook.train import resolve_device, train


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(cfg, data, k: int, repeats: int, one_run_s: float | None, warm_data) -> dict:
    """Best-of-repeats seconds for K separate runs (or K x one_run_s) and for one K-member stacked run, after an untimed
    K-member run on warm_data: kernel compiles and autotuning for this K's shapes stay out of the stacked time, as the
    K=1 warm-up keeps them out of the separate time."""
    cfgs = [dataclasses.replace(cfg, seed=s) for s in range(k)]
    train_stacked([dataclasses.replace(c, epochs=1) for c in cfgs], warm_data, [[] for _ in cfgs])
    if one_run_s is None:
        separate = min(timed(lambda: [train(c, data) for c in cfgs]) for _ in range(repeats))
    else:
        separate = k * one_run_s
    stacked = min(timed(lambda: train_stacked(cfgs, data, [[] for _ in cfgs])) for _ in range(repeats))
    return {"K": k, "separate_s": separate, "separate_measured": one_run_s is None, "stacked_s": stacked,
            "separate_runs_per_h": 3600 * k / separate, "stacked_runs_per_h": 3600 * k / stacked, "speedup": separate / stacked}


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments, --ks as a sorted list; a bad one exits 2 in one line, before any run."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stacked_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="batchnorm")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--train-subset", type=int, default=12800)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--epochs", type=int, default=1, help="epochs per run")
    parser.add_argument("--separate-up-to", type=int, default=8, help="largest K whose separate runs are timed")
    parser.add_argument("--nondeterministic", action="store_true", help="compute.deterministic off (CUDA)")
    parser.add_argument("--stacked-conv", default="auto",
                        help="compute.stacked_conv: auto, gemm, hybrid, grouped, fused (Triton, CUDA) or one per conv block joined by +")
    parser.add_argument("--fused-norm", action="store_true", help="compute.fused_norm: norm+pool+ReLU as Triton kernels (CUDA)")
    parser.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True, help="compute.channels_last")
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    try:
        run_config(args)
        ks = sorted(int(k) for k in args.ks.split(","))
        if ks[0] < 1 or ks[0] > args.separate_up_to:  # the smallest K's separate time is what larger K extrapolate
            raise ValueError
        args.ks = ks
    except ConfigError as e:
        usage_error(str(e))
    except ValueError:
        usage_error(f"ks={args.ks!r} must be a comma list of integers >= 1, the smallest <= --separate-up-to")
    return args


def run_config(args: argparse.Namespace):
    """The config each run trains, from the config file and the command line."""
    compute = {"precision": args.precision, "deterministic": not args.nondeterministic, "stacked_conv": args.stacked_conv,
               "fused_norm": args.fused_norm, "channels_last": args.channels_last}
    return load_config(args.config, CONFIGS_DIR, {"epochs": args.epochs, "device": args.device, "compute": compute,
                                                  "data": {"data_dir": args.data_dir, "train_subset": args.train_subset,
                                                           "test_subset": args.test_subset}})


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    cfg, ks = run_config(args), args.ks
    data = load_mnist(args.data_dir, args.train_subset, args.test_subset)
    warm = dataclasses.replace(cfg, epochs=1)  # warm-up: first-call costs (CUDA context, Triton compiles) out of the numbers
    train(warm, data)
    batch = cfg.data.batch_size  # a few full batches and the same last partial batch: the shapes the timed runs use
    warm_data = load_mnist(args.data_dir, min(args.train_subset, 2 * batch + args.train_subset % batch),
                           min(args.test_subset, 2 * batch + args.test_subset % batch))
    device = str(resolve_device(args.device)).split(":")[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    conv = conv_kind(cfg.compute.stacked_conv, resolve_device(args.device))
    suffix = ("-nondet" if args.nondeterministic else "") + ("" if args.channels_last else "-nchw") + \
        ("-fusednorm" if args.fused_norm and cfg.model.norm != "none" else "")
    stem = out / f"stacked_speed-{device}-{args.precision}-{conv}{suffix}"
    rows = []
    for k in ks:
        one = None if k <= args.separate_up_to else rows[0]["separate_s"] / rows[0]["K"]
        rows.append(measure(cfg, data, k, args.repeats, one, warm_data))
        print(f"  K={k}: separate {rows[-1]['separate_s']:.1f}s, stacked {rows[-1]['stacked_s']:.1f}s", file=sys.stderr, flush=True)
        table = pd.DataFrame(rows)  # written after every K: a stopped benchmark keeps what it measured
        table.to_csv(f"{stem}.csv", index=False)
        Path(f"{stem}.json").write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows}, indent=1))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nmachine: {machine()}\nwritten: {stem}.csv, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
