"""Optuna pruners for sweeps and stress studies, and the hook that reports each epoch's loss and stops a pruned trial."""
from __future__ import annotations

import contextlib
import math

import optuna

from cookbook.checkpoint import checkpoint_path, remove
from cookbook.hooks import Hook
from cookbook.tracking import DIVERGED_TAG, PRUNED_TAG, STEPS_RUN_TAG, MlflowTracker
from cookbook.train import EPOCH_LOSS
from experiments.boundary import CHANCE_LOSS
from experiments.storage import PRUNED_ATTR, SweepError

NO_PRUNER = "none"
PRUNERS = (NO_PRUNER, "median", "hyperband", "threshold")
RANKING = ("median", "hyperband")  # judge a trial's loss against other trials', in the direction of the study's objective
SWEEP_PRUNER = NO_PRUNER  # a grid is evidence, not a search: every cell runs to its end
# Stress trials already stop at divergence. The threshold pruner is opt-in: in a measured study it moved a boundary
# beyond its 90% interval, since near the boundary a first epoch above chance can still end converged (README,
# "Divergence boundary"). The ranking pruners do not fit at all: the study maximises the LR, so they would stop the
# trials that learn best.
STRESS_PRUNER = NO_PRUNER
PRUNER_ATTR = "pruner"  # study attr and parent-run tag: its name (Optuna stores no pruner; each worker builds it from this)


class TrainingPruned(Exception):
    """Raised by ReportToOptuna when the pruner stops a trial after an epoch; prunable() turns it into a PRUNED trial."""

    def __init__(self, epoch: int, steps_run: int, loss: float):
        super().__init__(f"pruned after epoch {epoch} (step {steps_run}), train loss {loss:.4g}")
        self.epoch, self.steps_run = epoch, steps_run


def make_pruner(name: str) -> optuna.pruners.BasePruner:
    """The pruner of that name: Optuna's own, with its defaults, and the threshold at chance loss."""
    return {NO_PRUNER: optuna.pruners.NopPruner, "median": optuna.pruners.MedianPruner,
            "hyperband": optuna.pruners.HyperbandPruner,
            "threshold": lambda: optuna.pruners.ThresholdPruner(upper=CHANCE_LOSS)}[name]()


def check_pruner(name: str, default: str, stack: int = 1, ranking: bool = True) -> str:
    """The pruner named (empty: default), or a one-line SweepError naming the bad value and the valid choices."""
    name = name or default
    choices = PRUNERS if ranking else tuple(p for p in PRUNERS if p not in RANKING)
    if name not in choices:
        why = "" if ranking else (" (a stress study maximises the LR that converges, so a pruner that ranks losses "
                                  "in that direction would stop the trials that learn best)")
        raise SweepError(f"pruner={name!r}; choose one of {', '.join(choices)}{why}")
    if name != NO_PRUNER and stack > 1:
        raise SweepError(f"pruner={name!r} with stack={stack}: a stacked model trains its seeds together, so one "
                         "cannot be stopped alone; use --stack 1 or --pruner none")
    return name


def stored_pruner(study: optuna.Study) -> str:
    """The name of the pruner the study was made with (none for studies made before pruners)."""
    return study.user_attrs.get(PRUNER_ATTR, NO_PRUNER)


def attach_pruner(study: optuna.Study) -> optuna.Study:
    """Give a loaded study the pruner it was made with (without one Optuna would use its MedianPruner)."""
    study.pruner = make_pruner(stored_pruner(study))
    return study


class ReportToOptuna(Hook):
    """Each epoch's mean training loss as the trial's intermediate value (optuna-dashboard's intermediate-values plot),
    the total and the divergence step as trial attrs, and the study's pruner asked after every epoch but the last.
    Put it last among the hooks: the others have the epoch's metrics when it stops the training."""

    def __init__(self, trial: optuna.Trial):
        self.trial, self.steps_per_epoch, self.epochs = trial, 0, 0

    def on_start(self, info):
        self.trial.set_user_attr("total_steps", info["total_steps"])  # what the trial would run unpruned
        self.steps_per_epoch = info["steps_per_epoch"]
        self.epochs = info["total_steps"] // info["steps_per_epoch"]

    def on_epoch_end(self, epoch, metrics):
        loss = metrics.get(EPOCH_LOSS)
        if loss is None or not math.isfinite(loss):  # a diverged epoch has no loss to report
            return
        self.trial.report(loss, step=epoch)
        if epoch < self.epochs and self.trial.should_prune():  # after the last epoch there is nothing left to save
            steps = epoch * self.steps_per_epoch
            self.trial.set_user_attr(PRUNED_ATTR, epoch)
            self.trial.set_user_attr("steps_run", steps)
            raise TrainingPruned(epoch, steps, loss)

    def on_end(self, result):
        if result.diverged:
            self.trial.set_user_attr("diverged_step", result.diverged_step)


@contextlib.contextmanager
def prunable(tracker: MlflowTracker):
    """Enter the trial's tracker; if the pruner stops the training, end the run FINISHED (tagged pruned=true, with the
    steps it ran) and then raise optuna.TrialPruned, so that Optuna records the trial PRUNED. Once the run's end is
    stored (finished or pruned, it is complete), delete its checkpoint: stopped before, the cell resumes from it."""
    stopped = None
    with tracker:
        try:
            yield tracker
        except TrainingPruned as stop:  # a FAILED run would say something broke; this one ended by the study's rule
            tracker.set_tags({PRUNED_TAG: "true", DIVERGED_TAG: "false", STEPS_RUN_TAG: stop.steps_run})
            stopped = stop
    remove(checkpoint_path(tracker.run_id))
    if stopped is not None:
        raise optuna.TrialPruned(str(stopped))
