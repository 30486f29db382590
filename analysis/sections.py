"""Each section of the report: tables, figures and the answer in words, from tracked runs only."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import figures, load
from analysis.select import TREATMENT_COLUMNS, baseline_runs, baseline_split, treatment_values
from analysis.stats import mean_ci95, within_noise
from cookbook.monitor import STEP_GRAD_NORM, STEP_LOSS
from cookbook.train import CLIP_FRACTION, EPOCH_LOSS

SEED_CLAIMS = {  # the seed document's table, shown beside the measurements, never used in a computation
    "no_tricks": {"epoch1_loss": "~0.8", "final_loss": "~0.15", "grad_norm": "Highly variable"},
    "batchnorm": {"epoch1_loss": "~0.3", "final_loss": "~0.05", "grad_norm": "Moderate"},
    "layernorm": {"epoch1_loss": "~0.4", "final_loss": "~0.08", "grad_norm": "Stable"},
    "all_tricks": {"epoch1_loss": "~0.25", "final_loss": "~0.04", "grad_norm": "Very stable"},
}


class Skip(Exception):
    """This section cannot be drawn from the runs given; the message says why."""


@dataclass
class Section:
    title: str
    text: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict = field(default_factory=dict)


def fmt_ci(mean: float, half: float, digits: int = 3) -> str:
    if np.isnan(mean):
        return "n/a"
    return f"{mean:.{digits}f}" if np.isnan(half) else f"{mean:.{digits}f} ± {half:.{digits}f}"


MISSING = "n/a"  # a value a table lacks (a mean of none, a std of one, a diverged run's loss): printed as such, never nan


def markdown_table(table: pd.DataFrame, **style) -> str:
    """A table as Markdown, a missing value (None, NaN) as MISSING."""
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, missingval=MISSING, **style)


def round_table(table: pd.DataFrame, lr_columns: list[str]) -> pd.DataFrame:
    """Losses and ratios to 4 decimals, learning rates to 4 significant digits (a 4-decimal LR 3.4e-5 would read 0.0)."""
    lrs = {c: pd.to_numeric(table[c]).map(lambda v: float(f"{v:.4g}")) for c in lr_columns}
    return table.round(4).assign(**lrs)


def scale_note(runs: pd.DataFrame) -> str:
    """The scale the section's runs were made at, and their seeds, as the section's first line."""
    seeds = ", ".join(str(v) for v in sorted(runs.seed.unique()))
    return f"*Scale: {'; '.join(sorted(runs.scale.unique()))}; seeds {seeds}.*\n\n"


RESULT_KEYS = ("epoch1_loss", "final_loss", "test_loss", "test_acc", "grad_norm_mean", "grad_norm_cv", "clip_fraction")
HISTORY_KEYS = ("epoch1_loss", "grad_norm_mean", "grad_norm_cv", "clip_fraction")  # the ones run_summary reads off histories


def grad_norm_cv(norms: pd.Series) -> float:
    """One run's pre-clip grad norm std over mean (NaN without any): per run, as seeds may differ in scale, then averaged."""
    return norms.std() / norms.mean() if len(norms) else np.nan


def run_summary(run: pd.Series) -> dict:
    """Per-run numbers for the results table, from the run's metric histories."""
    epoch_loss = load.history(run.run_id, EPOCH_LOSS)
    norms = load.history(run.run_id, STEP_GRAD_NORM)
    clip = load.history(run.run_id, CLIP_FRACTION)
    return {"epoch1_loss": epoch_loss.get(1, np.nan), "grad_norm_mean": norms.mean(),
            "grad_norm_cv": grad_norm_cv(norms),
            "clip_fraction": clip.mean() if len(clip) else np.nan}


def not_diverged(base: pd.DataFrame) -> tuple[pd.DataFrame, str]:
    """The runs a mean is taken over (diverged ones left out) and a note saying how many were left out, if any."""
    bad = base[base.diverged]
    note = f" {len(bad)} diverged runs left out (see Diverged runs)." if len(bad) else ""
    return base[~base.diverged], note


def results_table(runs: pd.DataFrame) -> Section:
    """1. One row per config (every config, even one whose every seed diverged): mean and 95% interval over the seeds
    that did not diverge, the seed's claim beside it."""
    base, earlier = baseline_split(runs)
    if base.empty:
        raise Skip("no finished run at a config's own settings")
    done, _ = not_diverged(base)
    summaries = pd.DataFrame([run_summary(r) for _, r in done.iterrows()], columns=list(HISTORY_KEYS))
    per_run = pd.concat([done.reset_index(drop=True), summaries], axis=1)
    rows, numeric = [], []
    for config, g in base.groupby("config"):
        ok = per_run[per_run.config == config]
        stats = {k: mean_ci95(ok[k]) for k in RESULT_KEYS}
        claim = SEED_CLAIMS.get(config, {})
        rows.append({"config": config, "seeds": len(g), "diverged runs": int(g.diverged.sum()),
                     "epoch-1 loss": fmt_ci(*stats["epoch1_loss"]), "seed claims": claim.get("epoch1_loss", ""),
                     "final train loss": fmt_ci(*stats["final_loss"]), "seed claims ": claim.get("final_loss", ""),
                     "test loss": fmt_ci(*stats["test_loss"]), "test acc": fmt_ci(*stats["test_acc"], digits=4),
                     "grad norm mean": fmt_ci(*stats["grad_norm_mean"]), "grad norm CV": fmt_ci(*stats["grad_norm_cv"]),
                     "seed claims  ": claim.get("grad_norm", ""), "clipped steps": fmt_ci(*stats["clip_fraction"])})
        numeric.append({"config": config, "seeds": len(g), "seeds_in_mean": len(ok), **{f"{k}_mean": v[0] for k, v in stats.items()},
                        **{f"{k}_ci95": v[1] for k, v in stats.items()}})
    values = pd.DataFrame(numeric).set_index("config")
    text = (scale_note(base) + f"{len(base)} runs, every config at its own settings (no model, optim or schedule key "
            "overridden). " + ranking(base, per_run, values) + other_settings(base, earlier))
    return Section("Results table", text, {"results": pd.DataFrame(rows), "results_values": values.reset_index()})


def other_settings(base: pd.DataFrame, earlier: pd.DataFrame) -> str:
    """A sentence naming the runs left out because their config's own settings differ from its latest run's."""
    if earlier.empty:
        return ""
    parts, values, now = [], treatment_values(earlier), treatment_values(base).groupby(base.config).last()
    for config, g in values.groupby(earlier.config):
        changed = [f"{k} {', '.join(sorted(set(g[k])))} (latest: {now.loc[config, k]})" for k in TREATMENT_COLUMNS
                   if (g[k] != now.loc[config, k]).any()]
        parts.append(f"{len(g)} runs of {config} at {'; '.join(changed)}")
    return (" Left out, trained at other own settings than their config's latest run (its file changed between "
            "runs, or another file of the same name): " + "; ".join(parts) + ".")


def ranking(base: pd.DataFrame, per_run: pd.DataFrame, values: pd.DataFrame) -> str:
    """Fastest first epoch and lowest final loss in words, among configs none of whose seeds diverged (a mean over a
    config's survivors would flatter it), and whether the runner-up is within seed noise."""
    unranked = base[base.diverged].groupby("config").size()
    ranked = values.drop(index=unranked.index)
    epoch1, final = ranked.epoch1_loss_mean.dropna(), ranked.final_loss_mean.dropna()
    parts = [f"**Fastest first epoch:** {epoch1.idxmin()} (epoch-1 loss {epoch1.min():.3f})." if len(epoch1) else ""]
    if len(final):
        lowest = final.idxmin()
        parts.append(f"**Lowest final loss:** {lowest} ({final[lowest]:.4f})")
        if len(final) > 1:
            runner_up = final.drop(lowest).idxmin()
            tie = within_noise(per_run[per_run.config == lowest].final_loss, per_run[per_run.config == runner_up].final_loss)
            behind = {True: "within seed noise of it", False: "behind it by more than seed noise",
                      None: "behind it; seed noise unknown (fewer than 2 seeds)"}
            parts[-1] += f"; {runner_up} ({final[runner_up]:.4f}) is {behind[tie]}"
        parts[-1] += "."
    if len(unranked):
        parts.append("Not ranked, a seed diverged: " + ", ".join(
            f"{c} ({n} of {int((base.config == c).sum())} seeds)" for c, n in unranked.items()) + ".")
    return " ".join(p for p in parts if p)


def loss_curves(runs: pd.DataFrame) -> Section:
    """2. All configs' per-step training loss on one axis (runs that diverged left out: their loss leaves the axis)."""
    base, note = not_diverged(baseline_runs(runs))
    if base.empty:
        raise Skip("no non-diverged run at a config's own settings")
    hist = load.histories(list(base.run_id), STEP_LOSS).merge(base[["run_id", "config", "seed"]], on="run_id")
    if hist.empty:
        raise Skip(f"none of these {len(base)} runs logged a per-step `{STEP_LOSS}`")
    return Section("Loss curves", scale_note(base) + f"{len(base)} runs, per-step `train/loss`.{note}",
                   figures={"loss_curves": figures.loss_curves(hist)})


CELL = ["config", "lr", "width", "depth", "warmup_epochs", "seed", "scale"]  # one training: phases that share it ran it alike


def diverged(runs: pd.DataFrame) -> Section:
    """8. Every diverged cell, a result in itself: where and when it blew up (a cell two phases trained, listed once)."""
    bad = runs[runs.diverged].sort_values(["config", "lr", "width", "seed", "start_time"])
    if bad.empty:
        raise Skip("no run diverged")
    cells = bad.groupby(CELL, dropna=False, sort=False)
    first = cells.head(1).assign(runs=cells.run_id.transform("size"), stress=cells.stress.transform(lambda s: s.notna().any()))
    counts = first.groupby("config").size()
    table = pd.DataFrame({"run": first.run_name.fillna(first.run_id), "config": first.config, "LR": first.lr,
                          "width": first.width, "warmup epochs": first.warmup_epochs, "seed": first.seed,
                          "diverged at step": first.diverged_step, "of steps": first.total_steps, "runs": first.runs,
                          "stress study": first.stress, "scale": first.scale})
    repeats = f"; {len(bad)} runs, a cell that two phases trained listed once" if len(bad) > len(first) else ""
    text = (f"{len(first)} of {len(runs.drop_duplicates(CELL))} cells diverged "
            f"({', '.join(f'{c}: {n}' for c, n in counts.items())}{repeats}): "
            "a non-finite loss or one above the divergence factor x the loss of step 0. They are marked in the LR "
            "figures, left out of means and curves, and count as the loss at init in LR sensitivity.")
    return Section("Diverged runs", text, {"diverged_runs": table})


def grad_norms(runs: pd.DataFrame, configs=("no_tricks", "all_tricks")) -> Section:
    """4. Pre-clip grad norm over training, the clip threshold against the 90th percentile."""
    base, note = not_diverged(baseline_runs(runs).query("config in @configs"))
    if base.empty:
        raise Skip(f"no non-diverged run of {' or '.join(configs)} at its own settings")
    hist = load.histories(list(base.run_id), STEP_GRAD_NORM).merge(base[["run_id", "config", "seed"]], on="run_id")
    if hist.empty:
        raise Skip(f"none of these {len(base)} runs logged a per-step `{STEP_GRAD_NORM}`")
    p90 = hist.groupby("config").value.quantile(0.9).to_dict()
    cv = hist.groupby(["config", "run_id"]).value.agg(grad_norm_cv).groupby("config").mean().to_dict()  # as the results table
    max_norms = base.max_norm.dropna().unique()
    max_norm = float(max_norms[0]) if len(max_norms) else None
    text = "; ".join(f"{c}: median {hist[hist.config == c].value.median():.2f}, 90th percentile {p90[c]:.2f}, CV {cv[c]:.2f}"
                     for c in sorted(p90))
    if max_norm is not None:
        clipped = {c: (hist[hist.config == c].value > max_norm).mean() for c in p90}
        text += (f". Clip threshold {max_norm:g}: " + ", ".join(f"{c} above it on {v:.0%} of steps" for c, v in clipped.items())
                 + ". The usual advice sets max_norm near the 90th percentile of pre-clip norms")
    return Section("Gradient norms: no_tricks vs all_tricks", scale_note(base) + text + "." + note,
                   figures={"grad_norm_over_training": figures.grad_norm_over_training(hist, max_norm, p90)})
