"""reproduce's verdict: a tracked metric history against a rerun's, metric by metric and step by step (pure functions)."""
from __future__ import annotations

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
