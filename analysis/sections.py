"""Each section of the report: tables, figures and the answer in words, from tracked runs only."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from analysis import figures, load
from analysis.stats import layer_spread, lr_sensitivity, mean_ci95, within_noise

SEED_CLAIMS = {  # the seed document's table, shown beside the measurements, never used in a computation
    "no_tricks": {"epoch1_loss": "~0.8", "final_loss": "~0.15", "grad_norm": "Highly variable"},
    "batchnorm": {"epoch1_loss": "~0.3", "final_loss": "~0.05", "grad_norm": "Moderate"},
    "layernorm": {"epoch1_loss": "~0.4", "final_loss": "~0.08", "grad_norm": "Stable"},
    "all_tricks": {"epoch1_loss": "~0.25", "final_loss": "~0.04", "grad_norm": "Very stable"},
}
SNAPSHOT_STEPS = (100, 500, 2000)


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


def baseline_runs(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs at each config's own settings: no LR/size/warmup override in their sweep cell (or not from a sweep)."""
    plain = runs[runs.stress.isna()]
    cell = plain.run_name.fillna("")
    own = ~cell.str.contains("lr=|width=|depth=|warmup_epochs=", regex=True)
    base = plain[own]
    return base[base.epochs == base.epochs.max()] if len(base) else base


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
    text = (f"Runs: {', '.join(sorted(done.run_name.fillna(done.run_id)))} ({int(done.epochs.max())} epochs). "
            f"**Fastest first epoch:** {fastest} (epoch-1 loss {values.epoch1_loss_mean[fastest]:.3f}). "
            f"**Lowest final loss:** {lowest} ({values.final_loss_mean[lowest]:.4f})"
            + (f"; {runner_up} ({values.final_loss_mean[runner_up]:.4f}) is "
               + ("within seed noise of it." if tie else "behind it by more than seed noise.") if runner_up else "."))
    return Section("Results table", text, {"results": table, "results_values": values.reset_index()})


def loss_curves(runs: pd.DataFrame) -> Section:
    """2. All configs' per-step training loss on one axis."""
    base = baseline_runs(runs)
    if base.empty:
        raise Skip("no run at a config's own settings")
    hist = load.histories(list(base.run_id), "train/loss").merge(base[["run_id", "config", "seed"]], on="run_id")
    return Section("Loss curves", f"{len(base)} runs, per-step `train/loss`.", figures={"loss_curves": figures.loss_curves(hist)})


def layer_norms(runs: pd.DataFrame) -> Section:
    """3. Per-layer pre-clip grad norms at steps 100/500/2000 and how far from uniform they are."""
    base = baseline_runs(runs)
    frames = [load.snapshots(r.run_id).assign(config=r.config, seed=r.seed) for r in base.itertuples()]
    snap = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    if snap.empty or not snap.step.isin(SNAPSHOT_STEPS).any():
        raise Skip(f"no run reached any of the snapshot steps {SNAPSHOT_STEPS} (runs too short, or no snapshots artifact)")
    snap = snap.assign(layer=snap.param.str.rsplit(".", n=1).str[0])
    bias_numel = snap[snap.param.str.endswith(".bias")].groupby("layer").numel.first()
    # conv and linear weights only: a norm layer's weight has as many entries as its bias, a conv's many more
    snap = snap[snap.step.isin(SNAPSHOT_STEPS) & snap.param.str.endswith(".weight") & (snap.numel > snap.layer.map(bias_numel))]
    spread = (snap.groupby(["config", "seed", "step"]).grad_norm.apply(layer_spread).groupby(["config", "step"]).mean()
              .unstack("step").round(1))
    missing = sorted(set(SNAPSHOT_STEPS) - set(snap.step))
    text = ("Table: ratio of the largest to the smallest per-layer pre-clip grad norm (conv and linear weights), "
            "mean over seeds, per snapshot step (1 = uniform across layers). "
            + ", ".join(f"{c}: {spread.loc[c].min():.1f}-{spread.loc[c].max():.1f}" for c in spread.index) + "."
            + (f" Steps {missing} were not reached by these runs." if missing else ""))
    return Section("Gradient norms across layers", text, {"layer_spread": spread.reset_index()},
                   {"layer_grad_norms": figures.layer_grad_norms(snap)})


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
    return Section("Gradient norms: no_tricks vs all_tricks", text + ".",
                   figures={"grad_norm_over_training": figures.grad_norm_over_training(hist, max_norm, p90)})


def lr_grid(runs: pd.DataFrame) -> pd.DataFrame:
    """Runs at each config's own width, depth, warmup and epochs, at any LR (the sweep's LR grid plus the baseline)."""
    base = baseline_runs(runs)
    plain = runs[runs.stress.isna() & ~runs.run_name.fillna("").str.contains("width=|depth=|warmup_epochs=", regex=True)]
    keys = ["config", "width", "depth", "warmup_epochs", "epochs"]
    return plain.merge(base[keys].drop_duplicates(), on=keys)


def lr_stress(runs: pd.DataFrame, reports: list[dict]) -> Section:
    """5. Final loss against LR per config, diverged runs marked, stress boundaries drawn in; the LR x100 table."""
    grid = lr_grid(runs)
    if grid.lr.nunique() < 2 and not reports:
        raise Skip("neither an LR grid (runs of a config at 2+ LRs) nor a stress study in this experiment")
    boundaries = {r["config"]: r["boundary_lr"] for r in reports if r.get("boundary_lr")}
    rows = [{"config": r["config"], "base LR": r["base_lr"], "LR x100": 100 * r["base_lr"], "seed": x["seed"],
             "outcome": "converged" if x["converged"] else f"diverged at step {int(x['diverged_step'])}" if x["diverged"]
             else "did not converge", "final loss": x["final_loss"]} for r in reports for x in r["x100"]]
    x100 = pd.DataFrame(rows)
    if x100.empty and len(grid):  # no stress study: read LR x100 off the grid, where it was run
        base_lr = baseline_runs(runs).groupby("config").lr.first()
        hit = grid[np.isclose(grid.lr, grid.config.map(base_lr) * 100)]
        x100 = pd.DataFrame({"config": hit.config, "LR x100": hit.lr, "seed": hit.seed,
                             "outcome": np.where(hit.diverged, "diverged", "finished"), "final loss": hit.final_loss})
    survivors = sorted(x100[x100.outcome == "converged"].config.unique()) if len(x100) else []
    text = ("**Survive LR x100:** " + (", ".join(survivors) if survivors else "none") + ". "
            + " ".join(f"{r['config']}: converged up to {r['largest_converged_lr']:.3g}, boundary "
                       f"{r['boundary_lr']:.3g}" + (f" [90% CI {r['boundary_lr_90ci'][0]:.3g}, {r['boundary_lr_90ci'][1]:.3g}]"
                                                    if r.get("boundary_lr_90ci") else "") + "."
                       for r in reports if r.get("boundary_lr") and r.get("largest_converged_lr")))
    figs = {"lr_stress": figures.lr_stress(grid, boundaries)} if grid.lr.nunique() >= 2 else {}
    return Section("LR stress", text, {"lr_x100": x100}, figs)


def isolation(runs: pd.DataFrame) -> Section:
    """7. Each config at its own best LR from the grid (an isolation plot's numbers), seed noise labelled."""
    grid = lr_grid(runs)
    grid = grid[~grid.diverged]
    if grid.groupby("config").lr.nunique().max() < 2:
        raise Skip("no config was run at 2 or more learning rates")
    mean = grid.groupby(["config", "lr"]).final_loss.mean()
    best = mean.groupby("config").idxmin().map(lambda k: k[1])
    rows = []
    for config, lr in best.items():
        at = grid[(grid.config == config) & np.isclose(grid.lr, lr)]
        rows.append({"config": config, "best LR": lr, "final loss at best LR": fmt_ci(*mean_ci95(at.final_loss), digits=4),
                     "test acc at best LR": fmt_ci(*mean_ci95(at.test_acc), digits=4), "seeds": len(at),
                     "runs": ", ".join(at.run_name.fillna(at.run_id))})
    table = pd.DataFrame(rows)
    winner = table.loc[table["final loss at best LR"].str.split(" ").str[0].astype(float).idxmin(), "config"]
    notes = []
    for config, lr in best.items():
        if config == winner:
            continue
        a = grid[(grid.config == config) & np.isclose(grid.lr, lr)].final_loss
        b = grid[(grid.config == winner) & np.isclose(grid.lr, best[winner])].final_loss
        notes.append(f"{config} vs {winner}: " + ("within seed noise" if within_noise(a, b) else "outside seed noise"))
    text = (f"Each config at the LR that is best for it on the grid. Best: **{winner}**. " + "; ".join(notes) + ".")
    return Section("Tuned comparison (best LR per config)", text, {"isolation": table})


def warmup_size(runs: pd.DataFrame) -> Section:
    """6. Final loss against LR per model size, with and without warmup; LR sensitivity against parameter count."""
    sized = runs[runs.stress.isna() & runs.run_name.fillna("").str.contains("width=|depth=", regex=True)]
    if sized.param_count.nunique() < 2 or sized.lr.nunique() < 2:
        raise Skip("no warmup-vs-size sweep here (runs at 2+ model sizes and 2+ learning rates, cells with width= or depth=)")
    sized = sized.assign(warmup=np.where(sized.warmup_epochs > 0, "warmup", "no warmup"), params=sized.param_count)
    init = float(np.log(10))  # loss of a uniform prediction over 10 classes: the loss at init
    sens = (sized.groupby(["params", "warmup", "lr"]).final_loss.mean().groupby(["params", "warmup"])
            .apply(lambda s: lr_sensitivity(list(s), init)).rename("sensitivity").reset_index())
    wide = sens.pivot(index="params", columns="warmup", values="sensitivity")
    critical = None
    if {"warmup", "no warmup"} <= set(wide.columns):
        gap = wide["no warmup"] - wide["warmup"]
        matters = gap[(gap > 0.01) & (wide["no warmup"] > 1.25 * wide["warmup"])]
        critical = int(matters.index.min()) if len(matters) else None
    answer = (f"Warmup starts to matter at **{critical:,} parameters** (the smallest size where the LR sensitivity "
              f"without warmup exceeds that with warmup by more than 25% and 0.01 nats)." if critical else
              "Within the sizes tried warmup never mattered by that rule (no-warmup LR sensitivity more than 25% and "
              "0.01 nats above warmup's).")
    return Section("Warmup vs model size", answer + "\n\n" + wide.round(4).to_markdown(),
                   {"lr_sensitivity_values": sens},
                   {"warmup_vs_size": figures.warmup_vs_size(sized), "sensitivity_vs_size": figures.sensitivity_vs_size(sens)})
