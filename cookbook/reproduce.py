"""reproduce: the rerun set up as the tracked run was, and the verdict, a tracked metric history against the rerun's,
metric by metric and step by step (pure functions)."""
from __future__ import annotations

import dataclasses

from . import resources
from .tracking import DIVERGED_TAG, PRUNED_TAG, STEPS_RUN_TAG
from .train import SUMMARY_KEYS, resolve_device

NOT_REPRODUCIBLE = ("time/", "system/")  # wall-clock metrics differ run to run by nature


def compare(tracked: dict[str, list[tuple[int, float]]], rerun: dict[str, list[tuple[int, float]]]) -> list[tuple[str, str]]:
    """(metric, verdict) for every metric either side has: 'exact' or the first step where they differ (a value missing
    on one side included)."""
    report = []
    for key in sorted(tracked.keys() | rerun.keys()):
        if key.startswith(NOT_REPRODUCIBLE):
            continue
        a, b = sorted(tracked.get(key, [])), sorted(rerun.get(key, []))
        if len(a) == len(b) and all(x[0] == y[0] and same(x[1], y[1]) for x, y in zip(a, b)):
            report.append((key, f"exact ({len(a)} values)"))
            continue
        at_a, at_b = dict(a), dict(b)
        step = next((s for s in sorted(at_a.keys() | at_b.keys()) if s not in at_a or s not in at_b or not same(at_a[s], at_b[s])),
                    None)
        where = f"step {step}: tracked {at_a.get(step, 'nothing')!r} vs rerun {at_b.get(step, 'nothing')!r}" if step is not None \
            else f"{len(a)} vs {len(b)} values"  # the same values, one side with a step twice
        report.append((key, f"MISMATCH at {where}"))
    return report


def same(x: float, y: float) -> bool:
    """Equal, NaN equal to NaN (a diverged run's loss)."""
    return x == y or (x != x and y != y)


def stopped_after(status: str, tags: dict[str, str]) -> int | None:
    """The steps a run ran that did not train to its end (pruned, KILLED, FAILED: its steps_run tag); None if it did."""
    return None if status == "FINISHED" and tags.get(PRUNED_TAG) != "true" else int(tags.get(STEPS_RUN_TAG, 0))


def through(rerun: dict[str, list[tuple[int, float]]], steps: int, steps_per_epoch: int) -> dict[str, list[tuple[int, float]]]:
    """A full rerun's history as far as a run stopped after `steps` steps got: per-step metrics below that step, per-epoch
    ones (logged at step = epoch) through its last whole epoch."""
    return {key: [(s, v) for s, v in series if s < (steps // steps_per_epoch + 1 if key in SUMMARY_KEYS else steps)]
            for key, series in rerun.items()}


def outcome_verdict(status: str, tags: dict[str, str], diverged: bool, steps_run: int) -> str:
    """The tracked outcome (diverged, steps run) against the rerun's; not compared for a run that stopped short."""
    stopped = stopped_after(status, tags)
    if stopped is not None:
        why = "pruned" if tags.get(PRUNED_TAG) == "true" else status
        return f"not compared: the run stopped after {stopped} steps ({why}); its metrics are compared as far as it got"
    rerun, tracked = f"diverged={str(diverged).lower()} steps_run={steps_run}", \
        f"diverged={tags.get(DIVERGED_TAG)} steps_run={tags.get(STEPS_RUN_TAG)}"
    return "exact" if rerun == tracked else f"MISMATCH: tracked {tracked}, rerun {rerun}"


def match_recorded(cfg, tags: dict[str, str]):
    """The config set up to run as the tracked run did (its torch threads and device), if it fits here (one-line
    ConfigError if not); print what still differs."""
    import torch

    from .resources import gpu_label
    from .stacked import STACKED_CONV_TAG
    from .tracking import DEVICE_TAG, GPU_TAG, THREADS_TAG, TORCH_TAG

    threads = tags.get(THREADS_TAG, "")
    if threads.isdigit():
        torch.set_num_threads(int(threads))  # results are bitwise reproducible only at the same thread count
    device = tags.get(DEVICE_TAG, "")
    if device and not (device.startswith("cuda") and not torch.cuda.is_available()):
        cfg = dataclasses.replace(cfg, device=device)
    resources.check(cfg)  # as train checks it, before the run is reopened (a cuda:3 tracked elsewhere may not be here)
    here = {THREADS_TAG: str(torch.get_num_threads()), TORCH_TAG: torch.__version__, DEVICE_TAG: cfg.device}
    print(f"reproducing with {here[THREADS_TAG]} torch thread(s), device {cfg.device}, torch {torch.__version__}, "
          f"precision {cfg.compute.precision}")
    differ = [f"{k} (tracked {tags[k]}, here {v})" for k, v in here.items() if tags.get(k) not in (None, v)]
    card = lambda label: (label or "none").split(" (CUDA_VISIBLE_DEVICES")[0]  # noqa: E731  (the model, not its slot)
    here_card = card(gpu_label(str(resolve_device(cfg.device))))
    if GPU_TAG in tags and card(tags[GPU_TAG]) != here_card:
        differ.append(f"gpu (tracked {card(tags[GPU_TAG])}, here {here_card})")
    if STACKED_CONV_TAG in tags:  # other kernels compute the same maths: equal up to float rounding, not bit for bit
        differ.append(f"stacked (tracked as a member of a stacked model, stacked_conv={tags[STACKED_CONV_TAG]}; here alone)")
    if differ:
        print(f"differs from the tracked run, so an exact match is not expected: {', '.join(differ)}")
    return cfg
