"""The seed's per-layer question: how pre-clip gradient norms spread across layers at steps 100, 500 and 2000."""
from __future__ import annotations

import pandas as pd

from analysis import figures, load
from analysis.sections import Section, Skip, fmt_ci, not_diverged, scale_note
from analysis.select import baseline_runs
from analysis.stats import layer_spread, mean_ci95

SNAPSHOT_STEPS = (100, 500, 2000)
UNIFORM_WITHIN = 2.0  # "uniform across layers": the largest per-layer norm is within this factor of the smallest


def layer_weights(snap: pd.DataFrame) -> pd.DataFrame:
    """Conv and linear weights only, each named by its place in the network (conv1.., fc)."""
    snap = snap.assign(layer=snap.param.str.rsplit(".", n=1).str[0])
    bias_numel = snap[snap.param.str.endswith(".bias")].groupby("layer").numel.first()
    # a norm layer's weight has as many entries as its bias, a conv's or linear layer's many more
    snap = snap[snap.param.str.endswith(".weight") & (snap.numel > snap.layer.map(bias_numel))]
    order = list(dict.fromkeys(snap.layer))
    convs = [x for x in order if not x.startswith("classifier")]
    names = {x: f"conv{i + 1}" for i, x in enumerate(convs)} | {x: "fc" for x in order if x.startswith("classifier")}
    return snap.assign(layer=snap.layer.map(names), layer_index=snap.layer.map(order.index))


def spread_per_seed(snap: pd.DataFrame) -> pd.DataFrame:
    """config, step, seed, spread (largest over smallest layer norm of that run at that step)."""
    return snap.groupby(["config", "step", "seed"]).grad_norm.apply(layer_spread).rename("spread").reset_index()


def spread_rows(snap: pd.DataFrame) -> pd.DataFrame:
    """Per config and step: largest/smallest layer norm (mean and 95% CI over seeds) and which layers they are."""
    per_seed = spread_per_seed(snap)
    mean = snap.groupby(["config", "step", "layer"]).grad_norm.mean().reset_index()
    rows = []
    for (config, step), g in per_seed.groupby(["config", "step"]):
        m, half = mean_ci95(g.spread)
        layers = mean[(mean.config == config) & (mean.step == step)].set_index("layer").grad_norm
        rows.append({"config": config, "step": int(step), "seeds": len(g), "max/min": m, "ci95": half,
                     "largest": layers.idxmax(), "smallest": layers.idxmin()})
    return pd.DataFrame(rows)


def describe(config: str, rows: pd.DataFrame) -> str:
    """One config's answer in words: uniform or not, which layers, by how much, and how it changes over the steps."""
    parts = [f"step {r.step}: {fmt_ci(r['max/min'], r.ci95, 1)}x ({r.largest} largest, {r.smallest} smallest)"
             for _, r in rows.sort_values("step").iterrows()]
    uniform = rows["max/min"] < UNIFORM_WITHIN
    verdict = ("uniform at every step" if uniform.all() else "not uniform at any step" if not uniform.any()
               else "uniform at step " + ", ".join(str(s) for s in rows[uniform].step) + " only")
    first, last = rows.sort_values("step").iloc[[0, -1]]["max/min"]
    change = "stays at about" if abs(last / first - 1) < 0.1 else "narrows from" if last < first else "widens from"
    trend = "" if len(rows) < 2 else f"; the spread {change} {first:.1f}x" + ("" if change.startswith("stays") else f" to {last:.1f}x")
    return f"- **{config}**: {verdict} ({'; '.join(parts)}){trend}."


def layer_norms(runs: pd.DataFrame) -> Section:
    """3. Per-layer pre-clip grad norms at the snapshot steps, per config, and how far from uniform they are."""
    base, note = not_diverged(baseline_runs(runs))
    frames = [load.snapshots(r.run_id).assign(config=r.config, seed=r.seed, run_id=r.run_id) for r in base.itertuples()]
    snap = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["step"])
    snap = snap[snap.step.isin(SNAPSHOT_STEPS)]
    if snap.empty:
        raise Skip(f"no run reached any of the snapshot steps {SNAPSHOT_STEPS} (runs too short, or no snapshots artifact)")
    snap = layer_weights(snap)
    spread = spread_rows(snap)
    norms = snap.groupby(["config", "layer_index", "layer", "step"]).grad_norm.apply(
        lambda v: fmt_ci(*mean_ci95(v), digits=4)).unstack("step").reset_index().drop(columns="layer_index")
    missing = sorted(set(SNAPSHOT_STEPS) - set(snap.step))
    text = (scale_note(base[base.run_id.isin(snap.run_id)]) +
            f"Pre-clip gradient norm of each conv and linear weight at steps {', '.join(map(str, sorted(set(snap.step))))} "
            f"(mean ± 95% CI over seeds), and the ratio of the largest to the smallest layer norm (1 = uniform; called "
            f"uniform below {UNIFORM_WITHIN:g}x).\n\n" + "\n".join(describe(c, g) for c, g in spread.groupby("config"))
            + (f"\n\nSteps {missing} were not reached by these runs." if missing else "") + note)
    spread_table = spread.assign(**{"max/min": [fmt_ci(m, h, 2) for m, h in zip(spread["max/min"], spread.ci95)]}).drop(columns="ci95")
    return Section("Gradient norms across layers", text,
                   {"layer_grad_norms": norms.rename(columns=lambda c: f"step {c}" if isinstance(c, (int, float)) else c),
                    "layer_spread": spread_table, "layer_spread_values": spread},
                   {"layer_grad_norms": figures.layer_grad_norms(snap.sort_values(["layer_index", "step"])),
                    "layer_spread": figures.layer_spread_over_steps(spread_per_seed(snap))})
