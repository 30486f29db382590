"""A stress study's report from its records: search range, boundary, the LR x100 probes, what pruning saved."""
from __future__ import annotations

import math

import optuna
import pandas as pd
from mlflow import MlflowClient
from optuna.trial import TrialState

from experiments.boundary import boundary
from experiments.pruning import stored_pruner
from experiments.storage import PRUNED_ATTR, RUN_ID_ATTR, run_status
from experiments.stress_range import LR_FIND_BLOWUP_ATTR, LR_FIND_RUN_ATTR, base_log_lr, search_range

DONE = (TrialState.COMPLETE, TrialState.PRUNED)
STRESS_RUN, STRESS_REPORT = "stress", "stress_report.json"  # the parent run's name and its report artifact
PRUNED_OUTCOME = "stopped by the pruner"  # how a probe the pruner stopped reads, where verdicts leave it out


def done_trials(study: optuna.Study) -> list[optuna.trial.FrozenTrial]:
    """Finished trials that trained (not ones pruned before they started)."""
    return [t for t in study.get_trials(deepcopy=False, states=DONE) if "converged" in t.user_attrs]


def unrecorded(study: optuna.Study) -> list[int]:
    """Finished trials whose MLflow run is not FINISHED in this store (another or a lost store, a deleted run)."""
    client = MlflowClient()
    return [t.number for t in done_trials(study) if run_status(client, t.user_attrs.get(RUN_ID_ATTR)) != "FINISHED"]


def report(study: optuna.Study) -> dict:
    """Range, boundary, the x100 table and the compute pruning saved, from the study's records."""
    columns = ["lr", "seed", "converged", "diverged", "diverged_step", "final_loss", "initial_loss", "steps_run", "total_steps",
               PRUNED_ATTR]
    df = pd.DataFrame([t.user_attrs for t in done_trials(study)]).reindex(columns=columns)
    spec = study.user_attrs
    base, (lo, hi) = base_log_lr(spec["config"], spec["settings"]), search_range(spec)
    x100 = df[(df.lr / 10**base - 100).abs() < 1e-6]
    steps_run, steps_full = int(df.steps_run.sum()), int(df.total_steps.sum())
    stopped = df[df[PRUNED_ATTR].notna()]
    probe = columns[1:7] + [PRUNED_ATTR]  # a probe the pruner stopped is no finished training: the report says so
    return {"config": spec["config"], "study": study.study_name, "base_lr": 10**base, "lr_range": [10**lo, 10**hi], "trials": len(df),
            "converge_ratio": spec["converge_ratio"], "pruner": stored_pruner(study),
            **{k: spec[k] for k in (LR_FIND_BLOWUP_ATTR, LR_FIND_RUN_ATTR) if k in spec},
            **boundary([math.log10(v) for v in df.lr], list(~df.converged.astype(bool))),
            "x100": x100[probe].astype(object).where(x100[probe].notna(), None).to_dict("records"),
            "steps_run": steps_run, "steps_without_pruning": steps_full,
            "pruning_saved": 1 - steps_run / steps_full if steps_full else 0.0,
            "pruned_by_pruner": len(stopped), "steps_saved_by_pruner": int((stopped.total_steps - stopped.steps_run).sum())}


def format_report(r: dict) -> str:
    """A few lines per config."""
    fmt = lambda v: "none in range" if v is None else f"{v:.3g}"  # noqa: E731
    low, high = r["lr_range"]
    blowup = r.get(LR_FIND_BLOWUP_ATTR)
    source = ("from its LR" if LR_FIND_RUN_ATTR not in r else f"around the LR range test's blow-up {blowup:.3g}" if blowup
              else "from its LR: the LR range test never blew up")
    lines = [f"{r['config']}: base lr {r['base_lr']:.3g}, range {low:.3g} to {high:.3g} ({source}), {r['trials']} trials "
             f"({r['failed']} failed): largest converged {fmt(r['largest_converged_lr'])}, "
             f"smallest failed {fmt(r['smallest_failed_lr'])}"]
    if "boundary_lr" in r:
        low, high = r["boundary_lr_90ci"]
        lines.append(f"  boundary (P(fail)=0.5) {r['boundary_lr']:.3g}, 90% CI [{low:.3g}, {high:.3g}]")
    for row in r["x100"]:
        state = probe_outcome(row)
        loss = "" if row["final_loss"] is None or pd.isna(row["final_loss"]) else f", final loss {row['final_loss']:.3f}"
        lines.append(f"  lr x100 seed {row['seed']}: {state}{loss}")
    lines.append(f"  steps run {r['steps_run']} of {r['steps_without_pruning']} without pruning (saved {r['pruning_saved']:.0%}; "
                 f"pruner {r['pruner']}: {r['pruned_by_pruner']} trials stopped, {r['steps_saved_by_pruner']} steps saved)")
    return "\n".join(lines)


def probe_outcome(probe: dict) -> str:
    """An LR x100 probe's outcome in words (reports written before probes kept PRUNED_ATTR read as before)."""
    if probe.get(PRUNED_ATTR) is not None:
        return f"{PRUNED_OUTCOME} after epoch {int(probe[PRUNED_ATTR])} (not a finished training)"
    return "converged" if probe["converged"] else f"diverged at step {int(probe['diverged_step'])}" if probe["diverged"] \
        else "did not converge"
