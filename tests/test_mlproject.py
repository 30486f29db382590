"""Every MLproject parameter reaches the command and lands on the config key it names."""
import shlex

import pytest
import yaml
from mlflow.projects import _project_spec

from conftest import CONFIGS_DIR, ROOT
from cookbook.cli import build_parser, overrides_from
from cookbook.config import FLAG_KEYS, flatten, load_config

# A distinctive, valid value per parameter, and the config key it must set.
PROBES = {
    "seed": ("11", "seed", 11), "lr": ("0.0123", "optim.lr", 0.0123), "epochs": ("7", "epochs", 7),
    "batch_size": ("77", "data.batch_size", 77), "max_norm": ("2.5", "optim.max_norm", 2.5),
    "warmup_epochs": ("0.25", "schedule.warmup_epochs", 0.25), "width": ("1.5", "model.width", 1.5),
    "depth": ("4", "model.depth", 4), "train_subset": ("999", "data.train_subset", 999),
    "test_subset": ("333", "data.test_subset", 333), "device": ("cpu", "device", "cpu"),
    "data_dir": ("/some/where", "data.data_dir", "/some/where"), "precision": ("bf16", "compute.precision", "bf16"),
}


def entry_point():
    return _project_spec.load_project(str(ROOT)).get_entry_point("main")


def parse(command: str):
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", "cookbook", "train"]
    args = build_parser().parse_args(argv[3:])
    return load_config(args.config, CONFIGS_DIR, overrides_from(args))


def test_mlproject_declares_the_required_parameters():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())
    declared = set(spec["entry_points"]["main"]["parameters"])
    assert {"config", *PROBES} <= declared
    assert set(PROBES) == declared - {"config"}, "add a probe for every new parameter"
    assert spec["python_env"] == "python_env.yaml"


def test_defaults_mean_as_the_config_file_says():
    cfg = parse(entry_point().compute_command({"config": "all_tricks"}, "/tmp"))
    assert cfg == load_config("all_tricks", CONFIGS_DIR)


@pytest.mark.parametrize("param", sorted(PROBES))
def test_each_parameter_reaches_its_config_key(param):
    value, key, expected = PROBES[param]
    cfg = parse(entry_point().compute_command({"config": "batchnorm", param: value}, "/tmp"))
    flat = flatten(cfg)
    assert flat[key] == expected
    untouched = flatten(load_config("batchnorm", CONFIGS_DIR))
    assert {k: v for k, v in flat.items() if k != key} == {k: v for k, v in untouched.items() if k != key}


def test_config_parameter_selects_the_file():
    assert parse(entry_point().compute_command({"config": "layernorm"}, "/tmp")).model.norm == "layer"


def test_max_norm_none_turns_clipping_off():
    cfg = parse(entry_point().compute_command({"config": "all_tricks", "max_norm": "none"}, "/tmp"))
    assert cfg.optim.max_norm is None


def test_cli_flags_cover_mlproject_parameters():
    assert set(PROBES) <= set(FLAG_KEYS)


NUMERIC = {"workers": "3", "stack": "4", "scale": "quick", "n_trials": "17", "factor": "500.0", "converge_ratio": "0.25"}


@pytest.mark.parametrize("entry", ["sweep", "stress"])
def test_every_sweep_and_stress_parameter_reaches_its_flag(entry):
    from experiments import stress, sweep

    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]["parameters"]
    probes = {name: NUMERIC.get(name, f"probe-{i}") for i, name in enumerate(spec)}
    command = _project_spec.load_project(str(ROOT)).get_entry_point(entry).compute_command(probes, "/tmp")
    argv = shlex.split(command)
    assert argv[:4] == ["python", "-m", f"experiments.{entry}", "run"]
    args = vars({"sweep": sweep, "stress": stress}[entry].build_parser().parse_args(argv[3:]))
    assert {name: str(args[name]) for name in spec} == probes


@pytest.mark.parametrize("entry,module", [("analyze", "analysis.cli"), ("study", "experiments.study")])
def test_analyze_and_study_parameters_reach_their_flags(entry, module):
    import importlib

    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"][entry]["parameters"]
    probes = {name: NUMERIC.get(name, f"probe-{i}") for i, name in enumerate(spec)}
    argv = shlex.split(_project_spec.load_project(str(ROOT)).get_entry_point(entry).compute_command(probes, "/tmp"))
    assert argv[:3] == ["python", "-m", module.removesuffix(".cli")]
    args = vars(importlib.import_module(module).build_parser().parse_args(argv[3:]))
    assert {name: str(args[name]) for name in spec} == probes


def test_lr_find_parameters_reach_their_flags():
    spec = yaml.safe_load((ROOT / "MLproject").read_text())["entry_points"]["lr_find"]["parameters"]
    probes = {"config": "layernorm", "steps": "17", "start_lr": "1e-05", "end_lr": "3.0", "train_subset": "500", "data_dir": "d"}
    assert set(probes) == set(spec)
    argv = shlex.split(_project_spec.load_project(str(ROOT)).get_entry_point("lr_find").compute_command(probes, "/tmp"))
    args = build_parser().parse_args(argv[3:])
    assert (args.config, args.steps, args.start_lr, args.end_lr, args.train_subset, args.data_dir) == \
        ("layernorm", 17, 1e-05, 3.0, "500", "d")
