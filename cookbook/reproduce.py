"""reproduce's verdict: a tracked metric history against a rerun's, metric by metric and step by step (pure functions)."""
from __future__ import annotations

from .tracking import DIVERGED_TAG, PRUNED_TAG, STEPS_RUN_TAG
from .train import SUMMARY_KEYS

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
