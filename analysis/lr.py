"""Sections about the learning rate: LR stress (x100 survivors, boundaries), tuned comparison, warmup vs model size."""
from __future__ import annotations

import numpy as np
import pandas as pd

from analysis import figures, load
from analysis.sections import Section, Skip, fmt_ci, round_table, scale_note
from analysis.select import LR_KEY, classified, lr_grid, main_scale, outcome, own_lr, size_sweep, sized_runs
from analysis.stats import capped_losses, lr_sensitivity, mean_ci95, noise_verdict
from cookbook.config import TRAIN_SIZE
from cookbook.monitor import STEP_LOSS
from experiments.boundary import CHANCE_LOSS, CONVERGE_RATIO
from experiments.stress_range import LR_FIND_RUN_ATTR
from experiments.stress_report import PRUNED_OUTCOME, probe_outcome

X100 = 100  # the seed's stress test: each config at 100 x its own LR


def latest_per_config(reports: list[dict]) -> dict[str, dict]:
    """The newest stress study of each config (reports come latest first): a rerun replaces, it does not add."""
    latest = {}
    for r in reports:
        latest.setdefault(r["config"], r)
    return latest


def converge_ratio(reports: list[dict]) -> float:
    """The ratio the stress study used (so grid runs and stress trials follow one rule), else the default."""
    return next((r["converge_ratio"] for r in reports if "converge_ratio" in r), CONVERGE_RATIO)


def x100_table(runs: pd.DataFrame, reports: list[dict], ratio: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows, the runs they came from): every config's runs at x100 its own LR at one scale (main_scale), else the stress probes."""
    grid = classified(runs, {LR_KEY})
    own = {c: own_lr(runs, c) for c in grid.config.unique()}  # once per config, not once per run
    hit = grid[[np.isclose(r.lr, X100 * own[r.config]) for r in grid.itertuples()]] if len(grid) else grid
    hit = main_scale(hit)
    if len(hit):
        hit = hit.assign(initial_loss=[load.history(r, STEP_LOSS).get(0, np.nan) for r in hit.run_id])
        return pd.DataFrame({"config": hit.config, "LR": hit.lr, "seed": hit.seed, "outcome": [outcome(r, ratio) for r in hit.itertuples()],
                             "final loss": hit.final_loss.round(4), "step-0 loss": hit.initial_loss.round(4),
                             "source": "LR grid"}), hit
    rows = [{"config": r["config"], "LR": X100 * r["base_lr"], "seed": x["seed"], "outcome": probe_outcome(x),
             "final loss": x["final_loss"], "step-0 loss": x.get("initial_loss", np.nan), "source": "stress study"}
            for r in latest_per_config(reports).values() for x in r["x100"]]
    return pd.DataFrame(rows, columns=["config", "LR", "seed", "outcome", "final loss", "step-0 loss", "source"]), hit


def survivors(x100: pd.DataFrame) -> str:
    """The survivor line, computed from the x100 table itself: converged seeds out of seeds, per config."""
    if x100.empty:
        return "**Survive LR x100:** not run."
    finished = x100[~x100.outcome.str.startswith(PRUNED_OUTCOME)]  # stopped by a pruner: neither survived nor failed
    stopped = sorted(set(x100.config) - set(finished.config))
    counts = finished.assign(ok=finished.outcome == "converged").groupby("config").ok.agg(["sum", "count"])
    all_ok = [f"{c} ({s}/{n} seeds)" for c, (s, n) in counts.iterrows() if s == n]
    some = [f"{c} ({s}/{n} seeds)" for c, (s, n) in counts.iterrows() if 0 < s < n]
    none = [c for c, (s, n) in counts.iterrows() if s == 0]
    return (f"**Survive LR x100:** {', '.join(all_ok) or 'none'}." + (f" In some seeds only: {', '.join(some)}." if some else "")
            + (f" Fail in every seed: {', '.join(none)}." if none else "")
            + (f" Stopped by the pruner in every seed (no verdict): {', '.join(stopped)}." if stopped else ""))


def boundaries(runs: pd.DataFrame, reports: list[dict]) -> str:
    """The stress studies' boundaries in words, with the scale their trials ran at (read off the trial runs)."""
    trials = runs[runs.stress.notna()]
    lines = []
    for r in latest_per_config(reports).values():  # a rerun study replaces the earlier one, as in the figure
        own = trials[trials.stress == r["study"]] if "study" in r else trials[trials.config == r["config"]]  # older reports
        at = ", ".join(sorted(own.scale.unique())) or ("not found: the pruner stopped every trial" if r.get("pruned_by_pruner")
                                                        == r["trials"] else "not found")  # its own trials', not an earlier study's
        found = (f"boundary {r['boundary_lr']:.3g}" + (f" [90% CI {r['boundary_lr_90ci'][0]:.3g}, {r['boundary_lr_90ci'][1]:.3g}]"
                                                       if r.get("boundary_lr_90ci") else "")
                 if r.get("boundary_lr") else "no boundary inside the range")
        largest = r.get("largest_converged_lr")
        lines.append(f"- {r['config']}: {r['trials']} trials, converged up to {largest:.3g}, {found}; pruning saved "
                     f"{r['pruning_saved']:.0%} of the steps. *Scale: {at}.*" if largest else
                     f"- {r['config']}: {r['trials']} trials, none converged. *Scale: {at}.*")
    return ("\n\n**Divergence boundaries** (stress study: P(fail) = 0.5 of a logistic fit against log10 LR, 90% "
            "bootstrap interval):\n\n" + "\n".join(lines)) if lines else ""


def lr_stress(runs: pd.DataFrame, reports: list[dict], tests: pd.DataFrame) -> Section:
    """5. The LR x100 table and survivors under one stated rule, stress boundaries beside the LR range tests' blow-ups,
    final loss against LR."""
    ratio = converge_ratio(reports)
    x100, hit = x100_table(runs, reports, ratio)
    grid = lr_grid(runs)
    if x100.empty and not reports and (grid.empty or grid.lr.nunique() < 2):
        raise Skip("no run at 100x a config's own LR, no LR grid (a config at 2+ LRs) and no stress study here")
    rule = (f"Rule, for grid runs and stress trials alike: **converged** = not diverged and final train loss < {ratio:g} x "
            "the loss of step 0; **diverged** = a non-finite loss or one above the divergence factor x the loss of step 0.")
    bounds = boundaries(runs, reports)
    versus, versus_table = range_test_vs_boundary(reports, tests) if reports else ("", pd.DataFrame())
    scale = scale_note(hit) if len(hit) else "*Scale: the stress study's (below).*\n\n" if reports else ""
    latest = latest_per_config(reports).values()
    figs = {"lr_stress": figures.lr_stress(grid, {r["config"]: r["boundary_lr"] for r in latest if r.get("boundary_lr")})} \
        if grid.lr.nunique() >= 2 else {}
    grid_note = f"\n\nFigure: final loss against LR. *Grid scale: {'; '.join(sorted(grid.scale.unique()))}.*" if figs else ""
    tables = {**({"lr_x100": x100} if len(x100) else {}), **({"range_test_vs_boundary": versus_table} if len(versus_table) else {})}
    return Section("LR stress", scale + rule + "\n\n" + survivors(x100) + bounds + versus + grid_note, tables, figs)


def blowup_verdict(blowup: float, r: dict) -> str:
    """Where the range test's blow-up lies against the stress boundary's 90% interval (else its bracket)."""
    low, high = r.get("boundary_lr_90ci") or (r.get("largest_converged_lr"), r.get("smallest_failed_lr"))
    where = "the boundary's 90% interval" if r.get("boundary_lr_90ci") else "the bracket (largest converged, smallest failed)"
    if np.isnan(blowup):
        return "the range test never blew up"
    if low is not None and blowup < low:
        return f"below {where}: {low / blowup:.2g}x under its low end"
    if high is not None and blowup > high:
        return f"above {where}: {blowup / high:.2g}x over its high end"
    return f"inside {where}" if low is not None and high is not None else f"no {where} to compare with"


def range_test_vs_boundary(reports: list[dict], tests: pd.DataFrame) -> tuple[str, pd.DataFrame]:
    """Each config's LR range-test blow-up beside its stress boundary: does one short run predict where training diverges?"""
    rows = []
    for config, r in latest_per_config(reports).items():
        mine = tests[tests.config == config].sort_values("start_time")
        named = mine[mine.run_id == r.get(LR_FIND_RUN_ATTR)]  # the one that set the study's range, else the latest
        if mine.empty:
            continue
        test = (named if len(named) else mine).iloc[-1]
        boundary = r.get("boundary_lr") or np.nan
        rows.append({"config": config, "range-test blow-up LR": test.blowup_lr, "stress boundary LR": boundary,
                     "90% interval": fmt_interval(r.get("boundary_lr_90ci")), "largest converged": r.get("largest_converged_lr"),
                     "smallest failed": r.get("smallest_failed_lr"), "boundary / blow-up": boundary / test.blowup_lr,
                     "blow-up lies": blowup_verdict(test.blowup_lr, r), "range test on": range_scale(test),
                     "study range from the test": r.get(LR_FIND_RUN_ATTR) == test.run_id})
    if not rows:
        return ("\n\nNo LR range test (`python -m cookbook lr-find`, or the stress study's `--range-from-lr-find`) of these "
                "configs was tracked here to set beside the boundaries."), pd.DataFrame()
    table = pd.DataFrame(rows)
    inside = table["blow-up lies"].str.startswith("inside").sum()
    never = table["range-test blow-up LR"].isna().sum()
    return (f"\n\n**LR range test vs stress boundary.** Does the one-run LR range test predict where full training "
            f"diverges? In {inside} of {len(table)} configs its blow-up LR (the smoothed loss passes 4x its minimum, LR "
            "rising each update) lies inside the stress boundary's 90% interval (without a fitted boundary: its bracket)"
            + (f"; in {never} it never blew up, so it said nothing of the boundary" if never else "")
            + "; the table says by how much it misses elsewhere. The boundary is where training at a fixed peak LR fails "
            "(diverges or does not converge) half the time."), round_table(table, RANGE_TEST_LRS)


RANGE_TEST_LRS = ["range-test blow-up LR", "stress boundary LR", "largest converged", "smallest failed"]


def fmt_interval(ci) -> str:
    """'[0.1, 0.3]', or n/a."""
    return f"[{ci[0]:.3g}, {ci[1]:.3g}]" if ci else "n/a"


def range_scale(test) -> str:
    """'60,000 images, batch 128': what the range test trained on."""
    images = int(test.train_subset) if pd.notna(test.train_subset) else TRAIN_SIZE
    return f"{min(images, TRAIN_SIZE):,} images, batch {int(test.batch_size)}"


def isolation(runs: pd.DataFrame) -> Section:
    """7. Each config at its own best LR from the grid (an isolation plot's numbers), seed noise labelled."""
    tried = lr_grid(runs)
    failed = tried.diverged | tried.final_loss.isna()  # an LR where any seed diverged is not a candidate: not its survivors' mean
    grid = tried[~tried.assign(failed=failed).groupby(["config", "lr"]).failed.transform("any")]
    if grid.empty or grid.groupby("config").lr.nunique().max() < 2:
        raise Skip("no config was run at 2 or more learning rates where no seed diverged")
    mean = grid.groupby(["config", "lr"]).final_loss.mean()
    best = mean.groupby("config").idxmin().map(lambda k: k[1])
    at_best = {c: grid[(grid.config == c) & np.isclose(grid.lr, lr)] for c, lr in best.items()}
    table = pd.DataFrame([{"config": c, "best LR": best[c], "LRs tried": tried[tried.config == c].lr.nunique(),
                           "LRs where a seed diverged": tried[tried.config == c].lr.nunique() - grid[grid.config == c].lr.nunique(),
                           "final loss at best LR": fmt_ci(*mean_ci95(at.final_loss), digits=4),
                           "test acc at best LR": fmt_ci(*mean_ci95(at.test_acc), digits=4), "seeds": len(at)}
                          for c, at in at_best.items()])
    winner = min(at_best, key=lambda c: at_best[c].final_loss.mean())
    notes = [f"{c} vs {winner}: {noise_verdict(at.final_loss, at_best[winner].final_loss)}" for c, at in at_best.items()
             if c != winner]
    compared = pd.concat(at_best.values())
    text = (scale_note(compared) + "Each config at the LR that is best for it on the grid, among LRs where no seed diverged. "
            f"Best: **{winner}**." + (f" {'; '.join(notes)}." if notes else ""))
    return Section("Tuned comparison (best LR per config)", text, {"isolation": table})


FAILED_EVERY_LR = "failed at every LR"


def size_table(sized: pd.DataFrame, init: float) -> pd.DataFrame:
    """Per model size and warmup: LR sensitivity, the best LR and its loss (means over seeds, a diverged seed counting as
    the loss at init), diverged runs."""
    rows = []
    for (params, warmup), g in sized.groupby(["params", "warmup"]):
        mean = g.assign(capped=capped_losses(g.final_loss, g.diverged, init)).groupby("lr").capped.mean()
        learned = (mean < init).any()  # else every LR failed: no best LR, and a sensitivity of 0 would read as LR-robust
        rows.append({"params": int(params), "width": g.width.iloc[0], "depth": int(g.depth.iloc[0]), "warmup": warmup,
                     "sensitivity": lr_sensitivity(list(mean), init) if learned else np.nan,
                     "best LR": mean.idxmin() if learned else np.nan, "best final loss": mean.min() if learned else np.nan,
                     "diverged runs": f"{int(g.diverged.sum())}/{len(g)}", "LRs": g.lr.nunique(), "seeds": g.seed.nunique(),
                     "note": "" if learned else FAILED_EVERY_LR})
    return pd.DataFrame(rows)


NO_WARMUP = "no warmup"


def warmup_labels(epochs: pd.Series) -> pd.Series:
    """'no warmup', and 'warmup' where one length was tried ('warmup 2 epochs' each, where several were: never pooled)."""
    lengths = sorted(epochs[epochs > 0].unique())
    named = {e: "warmup" if len(lengths) == 1 else f"warmup {e:g} epochs" for e in lengths}
    return epochs.map(lambda e: named.get(e, NO_WARMUP))


def warmup_verdict(table: pd.DataFrame, warmup: str, prefix: str = "") -> str:
    """Where no warmup's LR sensitivity exceeds this warmup length's by the rule, or no warmup failed at every LR where
    this length learned, at the sizes run both ways ('' if none)."""
    rule = (f"no-warmup LR sensitivity more than 25% and 0.01 nats above {warmup}'s, or no warmup {FAILED_EVERY_LR} "
            f"where {warmup} learned")
    sens = table.pivot(index="params", columns="warmup", values="sensitivity")  # NaN: failed at every LR, or not run
    ran = table.pivot(index="params", columns="warmup", values="LRs").notna()
    if NO_WARMUP not in ran or not (both := ran[NO_WARMUP] & ran[warmup]).any():
        return ""
    without, with_ = sens.loc[both, NO_WARMUP], sens.loc[both, warmup]
    gap = without - with_
    only_warmup_learned = without.isna() & with_.notna()
    matters = list(gap[((gap > 0.01) & (without > 1.25 * with_)) | only_warmup_learned].index)
    if matters and matters == list(without.index):
        return (f"{prefix}Warmup matters at **every size tried**, {min(matters):,} to {max(matters):,} parameters "
                f"({rule}); the table says by how much.")
    if matters:
        return (f"{prefix}Warmup starts to matter at **{min(matters):,} parameters** (the smallest size where the {rule}; "
                f"it holds at {', '.join(f'{m:,}' for m in matters)}).")
    return f"{prefix}Within the sizes tried warmup never mattered by the rule ({rule})."


def warmup_size(runs: pd.DataFrame) -> Section:
    """6. Final loss against LR per model size, with and without warmup; LR sensitivity against parameter count."""
    sized = size_sweep(runs)
    if sized.empty or sized.param_count.nunique() < 2 or sized.lr.nunique() < 2:
        raise Skip("no warmup-vs-size sweep here (runs that override model.width or model.depth, at 2+ sizes and 2+ LRs)")
    sized = sized.assign(warmup=warmup_labels(sized.warmup_epochs), params=sized.param_count)
    table = size_table(sized, CHANCE_LOSS)  # the loss of a uniform prediction over 10 classes: the loss at init
    lengths = sorted(set(table.warmup) - {NO_WARMUP})
    answers = [warmup_verdict(table, w, prefix=f"With {w}: " if len(lengths) > 1 else "") for w in lengths]
    answer = " ".join(a for a in answers if a) or "Warmup cannot be judged here: no size was run both with and without warmup."
    sens = table[["params", "warmup", "sensitivity"]]
    others = sorted(set(sized_runs(runs).config) - set(sized.config))
    text = (scale_note(sized) + f"Config {', '.join(sorted(sized.config.unique()))}; LR sensitivity = mean over the LR grid "
            "of min(final loss, ln 10) minus the best final loss (Wortsman et al. 2023); none where every LR failed. " + answer
            + (f" Size runs of {', '.join(others)} are not drawn: one config per section." if others else ""))
    return Section("Warmup vs model size", text, {"size_table": round_table(table, ["best LR"]), "lr_sensitivity_values": sens},
                   {"warmup_vs_size": figures.warmup_vs_size(sized), "sensitivity_vs_size": figures.sensitivity_vs_size(sens)})
