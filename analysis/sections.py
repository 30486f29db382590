"""Each section of the report: tables, figures and the answer in words, from tracked runs only."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import figures, load
from analysis.select import baseline_runs
from analysis.stats import mean_ci95, within_noise

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


def scale_note(runs: pd.DataFrame) -> str:
    """The scale the section's runs were made at, and their seeds, as the section's first line."""
    seeds = ", ".join(str(v) for v in sorted(runs.seed.unique()))
    return f"*Scale: {'; '.join(sorted(runs.scale.unique()))}; seeds {seeds}.*\n\n"


def run_summary(run: pd.Series) -> dict:
    """Per-run numbers for the results table, from the run's metric histories."""
    epoch_loss = load.history(run.run_id, "epoch/train_loss")
    norms = load.history(run.run_id, "opt/grad_norm_preclip")
    clip = load.history(run.run_id, "epoch/clip_fraction")
    return {"epoch1_loss": epoch_loss.get(1, np.nan), "grad_norm_mean": norms.mean(),
            "grad_norm_cv": norms.std() / norms.mean() if len(norms) else np.nan,
            "clip_fraction": clip.mean() if len(clip) else np.nan}


def results_table(runs: pd.DataFrame) -> Section:
    """1. One row per config: mean and 95% interval over seeds, the seed's claim beside it."""
    base = baseline_runs(runs)
    done = base[~base.diverged]
    if done.empty:
        raise Skip("no finished, non-diverged run at a config's own settings")
    per_run = pd.concat([done.reset_index(drop=True), pd.DataFrame([run_summary(r) for _, r in done.iterrows()])], axis=1)
    rows, numeric = [], []
    for config, g in per_run.groupby("config"):
        stats = {k: mean_ci95(g[k]) for k in ("epoch1_loss", "final_loss", "test_loss", "test_acc", "grad_norm_mean",
                                               "grad_norm_cv", "clip_fraction")}
        claim = SEED_CLAIMS.get(config, {})
        rows.append({"config": config, "seeds": len(g), "diverged runs": int(base[base.config == config].diverged.sum()),
                     "epoch-1 loss": fmt_ci(*stats["epoch1_loss"]), "seed claims": claim.get("epoch1_loss", ""),
                     "final train loss": fmt_ci(*stats["final_loss"]), "seed claims ": claim.get("final_loss", ""),
                     "test loss": fmt_ci(*stats["test_loss"]), "test acc": fmt_ci(*stats["test_acc"], digits=4),
                     "grad norm mean": fmt_ci(*stats["grad_norm_mean"]), "grad norm CV": fmt_ci(*stats["grad_norm_cv"]),
                     "seed claims  ": claim.get("grad_norm", ""), "clipped steps": fmt_ci(*stats["clip_fraction"])})
        numeric.append({"config": config, "seeds": len(g), **{f"{k}_mean": v[0] for k, v in stats.items()},
                        **{f"{k}_ci95": v[1] for k, v in stats.items()}})
    table, values = pd.DataFrame(rows), pd.DataFrame(numeric).set_index("config")
    fastest, lowest = values.epoch1_loss_mean.idxmin(), values.final_loss_mean.idxmin()
    runner_up = values.final_loss_mean.drop(lowest).idxmin() if len(values) > 1 else None
    tie = runner_up is not None and within_noise(per_run[per_run.config == lowest].final_loss,
                                                  per_run[per_run.config == runner_up].final_loss)
    behind = {True: "within seed noise of it.", False: "behind it by more than seed noise.",
              None: "behind it; seed noise unknown (fewer than 2 seeds)."}
    text = (scale_note(done) + f"{len(done)} runs, every config at its own settings (no model, optim or schedule key "
            f"overridden). **Fastest first epoch:** {fastest} (epoch-1 loss {values.epoch1_loss_mean[fastest]:.3f}). "
            f"**Lowest final loss:** {lowest} ({values.final_loss_mean[lowest]:.4f})"
            + (f"; {runner_up} ({values.final_loss_mean[runner_up]:.4f}) is "
               + behind[tie] if runner_up else "."))
    return Section("Results table", text, {"results": table, "results_values": values.reset_index()})


def loss_curves(runs: pd.DataFrame) -> Section:
    """2. All configs' per-step training loss on one axis."""
    base = baseline_runs(runs)
    if base.empty:
        raise Skip("no run at a config's own settings")
    hist = load.histories(list(base.run_id), "train/loss").merge(base[["run_id", "config", "seed"]], on="run_id")
    return Section("Loss curves", scale_note(base) + f"{len(base)} runs, per-step `train/loss`.",
                   figures={"loss_curves": figures.loss_curves(hist)})


def diverged(runs: pd.DataFrame) -> Section:
    """8. Every diverged run, a result in itself: where and when it blew up."""
    bad = runs[runs.diverged].sort_values(["config", "lr", "width", "seed"])
    if bad.empty:
        raise Skip("no run diverged")
    counts = bad.groupby("config").size()
    table = pd.DataFrame({"run": bad.run_name.fillna(bad.run_id), "config": bad.config, "LR": bad.lr, "width": bad.width,
                          "warmup epochs": bad.warmup_epochs, "seed": bad.seed, "diverged at step": bad.diverged_step,
                          "of steps": bad.total_steps, "stress study": bad.stress.notna(), "scale": bad.scale})
    text = (f"{len(bad)} of {len(runs)} runs diverged ({', '.join(f'{c}: {n}' for c, n in counts.items())}): "
            "a non-finite loss or one above the divergence factor x the loss of step 0. They are marked in the LR "
            "figures and left out of means.")
    return Section("Diverged runs", text, {"diverged_runs": table})


def grad_norms(runs: pd.DataFrame, configs=("no_tricks", "all_tricks")) -> Section:
    """4. Pre-clip grad norm over training, the clip threshold against the 90th percentile."""
    base = baseline_runs(runs)
    base = base[base.config.isin(configs)]
    if base.empty:
        raise Skip(f"no run of {' or '.join(configs)} at its own settings")
    hist = load.histories(list(base.run_id), "opt/grad_norm_preclip").merge(base[["run_id", "config", "seed"]], on="run_id")
    p90 = hist.groupby("config").value.quantile(0.9).to_dict()
    cv = hist.groupby("config").value.agg(lambda v: v.std() / v.mean()).to_dict()
    max_norms = base.max_norm.dropna().unique()
    max_norm = float(max_norms[0]) if len(max_norms) else None
    text = "; ".join(f"{c}: median {hist[hist.config == c].value.median():.2f}, 90th percentile {p90[c]:.2f}, CV {cv[c]:.2f}"
                     for c in sorted(p90))
    if max_norm is not None:
        clipped = {c: (hist[hist.config == c].value > max_norm).mean() for c in p90}
        text += (f". Clip threshold {max_norm:g}: " + ", ".join(f"{c} above it on {v:.0%} of steps" for c, v in clipped.items())
                 + ". The usual advice sets max_norm near the 90th percentile of pre-clip norms")
    return Section("Gradient norms: no_tricks vs all_tricks", scale_note(base) + text + ".",
                   figures={"grad_norm_over_training": figures.grad_norm_over_training(hist, max_norm, p90)})
