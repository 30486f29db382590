"""Runs per hour: K seeds as K separate runs vs one stacked (vectorised) run, for K = 1, 2, 4, 8.

    python -m benchmarks.stacked_speed --config batchnorm --ks 1,2,4,8 --train-subset 12800 --device auto

A "run" here is one epoch over --train-subset images plus the test pass on --test-subset; runs per
hour scale inversely with that length, the ratio stacked/separate is what to read.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import pandas as pd

from benchmarks.train_speed import CONFIGS_DIR, machine
from cookbook.config import ConfigError, load_config
from cookbook.data import load_mnist
from cookbook.stacked import train_stacked
from cookbook.train import resolve_device, train


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def measure(cfg, data, k: int, repeats: int) -> dict:
    """Best-of-repeats seconds for K separate runs and for one K-member stacked run."""
    cfgs = [dataclasses.replace(cfg, seed=s) for s in range(k)]
    separate = min(timed(lambda: [train(c, data) for c in cfgs]) for _ in range(repeats))
    stacked = min(timed(lambda: train_stacked(cfgs, data, [[] for _ in cfgs])) for _ in range(repeats))
    return {"K": k, "separate_s": separate, "stacked_s": stacked, "separate_runs_per_h": 3600 * k / separate,
            "stacked_runs_per_h": 3600 * k / stacked, "speedup": separate / stacked}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stacked_speed", description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="batchnorm")
    parser.add_argument("--ks", default="1,2,4,8")
    parser.add_argument("--train-subset", type=int, default=12800)
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="fp32", choices=["fp32", "bf16"])
    parser.add_argument("--data-dir", default="data")
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    try:
        cfg = load_config(args.config, CONFIGS_DIR, {"epochs": 1, "device": args.device, "compute": {"precision": args.precision},
                                                     "data": {"data_dir": args.data_dir, "train_subset": args.train_subset,
                                                              "test_subset": args.test_subset}})
        ks = [int(k) for k in args.ks.split(",")]
        if min(ks) < 1:
            raise ValueError
    except ValueError:
        print(f"error: ks={args.ks!r} must be a comma list of integers >= 1", file=sys.stderr)
        return 2
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    data = load_mnist(args.data_dir, args.train_subset, args.test_subset)
    train(cfg, data)  # warm-up: first-call costs (allocator, kernels, CUDA context) out of the numbers
    rows = []
    for k in ks:
        rows.append(measure(cfg, data, k, args.repeats))
        print(f"  K={k}: separate {rows[-1]['separate_s']:.1f}s, stacked {rows[-1]['stacked_s']:.1f}s", file=sys.stderr, flush=True)
    table = pd.DataFrame(rows)
    device = str(resolve_device(args.device)).split(":")[0]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"stacked_speed-{device}-{args.precision}"
    table.to_csv(f"{stem}.csv", index=False)
    Path(f"{stem}.json").write_text(json.dumps({"machine": machine(), "args": vars(args), "rows": rows}, indent=1))
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nmachine: {machine()}\nwritten: {stem}.csv, {stem}.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
