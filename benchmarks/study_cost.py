"""What each phase of a study scale costs on this machine: one phase measured, the others estimated from it.

    python -m benchmarks.study_cost --experiment study-full --measured seeds=95.2 --scale full

The estimate of a phase = the measured phase's minutes x (the phase's training work / the measured
phase's). Work = updates x forward FLOPs per image of the model size (torch's FlopCounterMode),
with the updates a run at that (config, LR, width, warmup) really ran before diverging, read from the
experiment's runs at any scale (a run that diverges at step 1 costs nothing). Stress trials are
counted as runs at the config's own LR (an upper bound: TPE's high LRs diverge early).
"""
from __future__ import annotations

import argparse
import functools
import itertools
import sys

import pandas as pd
import torch
from torch.utils.flop_counter import FlopCounterMode

from analysis.load import training_runs
from cookbook.config import CONFIGS_DIR, TRAIN_SIZE, load_config
from cookbook.model import build_model
from experiments.study import CONFIGS, PHASES, SCALES, SIZE_CONFIG, X100_LR, Scale


@functools.lru_cache
def flops_per_image(width: float) -> int:
    """Forward FLOPs of one 28x28 image through the model at this width (work scales with it)."""
    model = build_model(load_config(SIZE_CONFIG, CONFIGS_DIR, {"model": {"width": width}}).model)
    with FlopCounterMode(display=False) as counter:
        model(torch.zeros(1, 1, 28, 28))
    return counter.get_total_flops()


def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",")]


def phase_cells(scale: Scale) -> dict[str, list[tuple[str, float | None, float]]]:
    """(config, lr, width) of every run of each phase (warmup 0 and 1 both listed); None LR = the config's own."""
    configs = CONFIGS.split(",")
    count = lambda text: len(text.split(","))  # noqa: E731  (seeds in a comma list)
    size = itertools.product(floats(scale.size_lrs), floats(scale.widths), ("no warmup", "warmup"))
    return {
        "seeds": [(c, None, 1.0) for c in configs] * count(scale.seeds),
        "x100": [(c, float(X100_LR), 1.0) for c in configs] * count(scale.grid_seeds),
        "grid": [(c, lr, 1.0) for c, lr in itertools.product(configs, floats(scale.grid_lrs))] * count(scale.grid_seeds),
        "size": [(SIZE_CONFIG, lr, w) for lr, w, _ in size] * count(scale.size_seeds),
        "stress": [(c, None, 1.0) for c in configs] * scale.stress_trials,
    }


def completed_fraction(runs: pd.DataFrame, config: str, lr: float | None, width: float) -> float:
    """Mean fraction of its updates such a run ran here before diverging (1 when never seen diverge or not run)."""
    own = load_config(config, CONFIGS_DIR).optim.lr
    at = runs[(runs.config == config) & ((runs.lr - (lr or own)).abs() < 1e-12) & ((runs.width - width).abs() < 1e-9)]
    return float((at.steps_run / at.total_steps).mean()) if len(at) else 1.0


def work(cells, runs: pd.DataFrame, epochs: int, images: int, batch: int = 128) -> float:
    """Training FLOPs of the phase (forward FLOPs x updates x batch; backward is a fixed multiple)."""
    updates = epochs * -(-images // batch)
    return sum(flops_per_image(w) * batch * updates * completed_fraction(runs, c, lr, w) for c, lr, w in cells)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.study_cost", description=__doc__.split("\n\n")[0])
    parser.add_argument("--experiment", required=True, help="where the measured phase's runs (and any others) are tracked")
    parser.add_argument("--measured", required=True, help="PHASE=MINUTES of the phase that was run at this scale")
    parser.add_argument("--scale", default="full")
    args = parser.parse_args(argv)
    phase, _, minutes = args.measured.partition("=")
    if args.scale not in SCALES or phase not in PHASES:
        print(f"error: scale={args.scale!r} phase={phase!r}; choose a scale from {', '.join(SCALES)} "
              f"and a phase from {', '.join(PHASES)}", file=sys.stderr)
        return 2
    scale, runs = SCALES[args.scale], training_runs(args.experiment)
    epochs = int(scale.train[scale.train.index("--epochs") + 1])
    images = int(scale.train[scale.train.index("--train-subset") + 1]) if "--train-subset" in scale.train else TRAIN_SIZE
    cost = {name: work(cells, runs, epochs, images) for name, cells in phase_cells(scale).items()}
    per_flop = float(minutes) / cost[phase]
    table = pd.DataFrame([{"phase": name, "runs": len(phase_cells(scale)[name]), "TFLOP (forward)": c / 1e12,
                           "ratio to measured": c / cost[phase], "minutes": c * per_flop,
                           "": "measured" if name == phase else "estimated"} for name, c in cost.items()])
    print(table.to_string(index=False, float_format=lambda v: f"{v:.1f}"))
    print(f"total {table.minutes.sum():.0f} min ({table.minutes.sum() / 60:.1f} h) for scale '{args.scale}' on this machine")
    return 0


if __name__ == "__main__":
    sys.exit(main())
