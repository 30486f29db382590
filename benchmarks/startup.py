"""What a process of each entry point pays before it does anything: the seconds to import its module, against the floor
of importing torch and MLflow, which every one of them needs. Sweep and stress workers are started per phase (and per
stress config), so this is paid again and again in a study.

    python -m benchmarks.startup --repeats 5
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

import pandas as pd

FLOOR = "torch, mlflow"
MODULES = ("experiments.sweep", "experiments.stress", "cookbook.cli", "experiments.study", "analysis.cli")
HEAVY = ("matplotlib.pyplot", "scipy.optimize", "seaborn")  # what a worker has no use for


def import_seconds(modules: str) -> float:
    """Wall seconds of a fresh interpreter importing modules (a comma list) and exiting."""
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", f"import {modules}"], check=True)
    return time.perf_counter() - started


def heavy_imports(module: str) -> list[str]:
    """Which of HEAVY a fresh interpreter holds after importing module."""
    probe = f"import sys, {module}; print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    return [m for m in subprocess.run([sys.executable, "-c", probe], check=True, capture_output=True,
                                      text=True).stdout.strip().split(",") if m]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.startup", description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="fresh interpreters per row (the table shows the median)")
    args = parser.parse_args(argv)
    times = {modules: [] for modules in (FLOOR, *MODULES)}
    for _ in range(args.repeats):  # interleaved: a machine slowing meanwhile slows every row alike
        for modules, seconds in times.items():
            seconds.append(import_seconds(modules))
    floor = statistics.median(times[FLOOR])
    table = pd.DataFrame([{"import": modules, "median_s": statistics.median(seconds), "min_s": min(seconds),
                           "x_floor": statistics.median(seconds) / floor,
                           "also_imports": ",".join(heavy_imports(modules)) if modules in MODULES else ""}
                          for modules, seconds in times.items()])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.2f}"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
