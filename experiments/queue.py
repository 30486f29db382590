"""A sweep's queue on Optuna: the grid stored on the study, a cell = an enqueued trial, done = a recorded finished trial."""
from __future__ import annotations

from typing import NamedTuple

import optuna
from optuna.trial import TrialState

from experiments.grid import cell_key, group_key
from experiments.pruning import PRUNER_ATTR, SWEEP_PRUNER, attach_pruner, stored_pruner
from experiments.storage import QUEUED_CELL_ATTR, SweepError, load_existing, open_storage, recorded_trials, stamp_owner


def open_study(storage_spec: str, name: str, cells: list[dict] | None = None, settings: dict | None = None,
               pruner: str = SWEEP_PRUNER) -> optuna.Study:
    """Create (with the grid and the pruner's name stored on it) or load the sweep's study, with its pruner."""
    if cells is None:
        return attach_pruner(load_existing(storage_spec, name, "cells", "sweep"))
    study = optuna.create_study(study_name=name, storage=open_storage(storage_spec), direction="minimize",
                                load_if_exists=True)
    if "cells" not in study.user_attrs and (study.user_attrs or study.trials):  # e.g. a stress study's name
        raise SweepError(f"study '{name}' in storage '{storage_spec}' is not a sweep; name a new one with --study")
    if "cells" not in study.user_attrs:
        study.set_user_attr("cells", cells)
        study.set_user_attr("settings", settings)
        study.set_user_attr(PRUNER_ATTR, pruner)
    held = sorted(cell_key(c) for c in study.user_attrs["cells"])
    if held != sorted(cell_key(c) for c in cells) or study.user_attrs.get("settings", settings) != settings:
        raise SweepError(f"study '{name}' holds another sweep ({len(held)} cells, settings {study.user_attrs['settings']}); "
                         "run it with the flags that made it, or name a new one with --study")
    made_with = stored_pruner(study)
    if made_with != pruner:
        raise SweepError(f"pruner={pruner!r}: study '{name}' was made with pruner={made_with!r}; resume it with that")
    return attach_pruner(study)


def enqueue_missing(study: optuna.Study) -> int:
    """Enqueue every cell that is neither finished nor queued nor running; return how many."""
    keys = [cell_key(c) for c in study.user_attrs["cells"]]
    taken = {t.user_attrs.get(QUEUED_CELL_ATTR)
             for t in recorded_trials(study) + study.get_trials(deepcopy=False, states=(TrialState.WAITING, TrialState.RUNNING))}
    missing = [k for k in keys if k not in taken]
    cells = {cell_key(c): c for c in study.user_attrs["cells"]}
    missing.sort(key=lambda k: (group_key(cells[k]), cells[k]["seed"] or 0))  # seeds of a group side by side, for --stack
    for key in missing:
        study.enqueue_trial({"cell": key}, user_attrs={QUEUED_CELL_ATTR: key})
    return len(missing)


def is_duplicate(study: optuna.Study, trial: optuna.Trial, key: str) -> bool:
    """Another trial already finished this cell, or an earlier trial is running it (possible only if a cell was enqueued
    twice). Only the later copy yields: two copies taken at the same instant would otherwise each prune the other."""
    running = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)) if t.number < trial.number]
    return any(other.number != trial.number and other.user_attrs.get(QUEUED_CELL_ATTR) == key
               for other in recorded_trials(study) + running)


def take_cell(trial: optuna.Trial) -> dict:
    """Mark the trial as this worker's, name its cell as the trial's param; prune strays and duplicates."""
    stamp_owner(trial)
    if QUEUED_CELL_ATTR not in trial.user_attrs:  # the queue was empty when this trial started: nothing to do
        raise optuna.TrialPruned("not a queued cell")
    cells = {cell_key(c): c for c in trial.study.user_attrs["cells"]}
    key = trial.suggest_categorical("cell", list(cells))
    if key != trial.user_attrs[QUEUED_CELL_ATTR]:  # queued without its cell: the sampler drew one; the queue makes it again
        raise optuna.TrialPruned(f"drew '{key}', not its queued cell '{trial.user_attrs[QUEUED_CELL_ATTR]}'")
    for field, value in cells[key].items():  # readable columns in optuna-dashboard
        trial.set_user_attr(field, value)
    if is_duplicate(trial.study, trial, key):
        raise optuna.TrialPruned(f"duplicate of a finished or running '{key}'")
    return cells[key]


class Claim(NamedTuple):
    """A queued cell this worker took: its trial and the cell's fields."""

    trial: optuna.Trial
    cell: dict


def claim(study: optuna.Study, k: int) -> list[Claim]:
    """Take up to k queued cells (ask() pops the oldest queued trial), pruning strays and duplicates; stopped meanwhile,
    every trial it asked fails (the worker gives their cells back)."""
    taken, untold = [], []
    try:
        while len(taken) < k and state_counts(study)["waiting"]:
            untold.append(study.ask())
            try:
                taken.append(Claim(untold[-1], take_cell(untold[-1])))
            except optuna.TrialPruned:
                study.tell(untold.pop(), state=TrialState.PRUNED)
    except BaseException:
        for trial in untold:
            study.tell(trial, state=TrialState.FAIL)
        raise
    return taken


def state_counts(study: optuna.Study) -> dict[str, int]:
    """Cells done / queued / running (duplicates and strays not counted)."""
    trials = study.get_trials(deepcopy=False)
    done = {t.params["cell"] for t in recorded_trials(study)}
    return {"done": len(done), "total": len(study.user_attrs["cells"]),
            "waiting": sum(t.state == TrialState.WAITING for t in trials),
            "running": sum(t.state == TrialState.RUNNING for t in trials)}
