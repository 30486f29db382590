"""A config's stress study: named by its spec (the same command resumes it), made with its probes queued, or loaded."""
from __future__ import annotations

import optuna

from experiments.grid import spec_name
from experiments.pruning import attach_pruner
from experiments.storage import load_existing, open_storage
from experiments.stress_range import base_log_lr, search_range
from experiments.workers import worker_index


def open_stress_study(storage: str, config: str, spec: dict | None = None, name: str | None = None) -> optuna.Study:
    """Create (storing the study's spec and probing the base and x100 LRs of every seed that lie in the range) or load a
    config's study, with its pruner."""
    if spec is not None:
        name = stress_name(spec)
    sampler = optuna.samplers.TPESampler(seed=0, n_startup_trials=4)
    if spec is None:  # a worker: its own seed, by its index and the trials so far (alike, parallel workers or a later
        study = load_existing(storage, name, "config", "stress study")  # round drew the same points again)
        study.sampler = optuna.samplers.TPESampler(seed=worker_index() + 1000 * len(study.trials), n_startup_trials=4)
        return attach_pruner(study)
    study = optuna.create_study(study_name=name, storage=open_storage(storage), direction="maximize",
                                sampler=sampler, load_if_exists=True)
    if "config" not in study.user_attrs:
        for key, value in spec.items():
            study.set_user_attr(key, value)
        (lo, hi), base = search_range(spec), base_log_lr(config, spec["settings"])
        for seed in spec["seeds"]:
            for log_lr in (base, base + 2):  # the config's own LR and the seed's "LR x100"
                if lo <= log_lr <= hi:
                    study.enqueue_trial({"log10_lr": log_lr, "seed": seed}, skip_if_exists=True)
    return attach_pruner(study)


def stress_name(spec: dict) -> str:
    """A config's stress study is named by its spec: the same command resumes it."""
    return spec_name(f"stress-{spec['config']}", spec, 8)
