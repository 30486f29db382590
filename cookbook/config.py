"""Typed run configuration: dataclass defaults, small YAML overrides, strict validation."""
from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from .yaml_values import dump_yaml, load_yaml

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"  # the named configs
TRAIN_SIZE, TEST_SIZE = 60_000, 10_000  # MNIST's published split: the most a subset can take
DEFAULT_EXPERIMENT = "stability-cookbook"  # the MLflow experiment every command tracks into unless told otherwise
# Command-line flag (CLI, sweep, stress, MLproject parameter) -> the config key it sets.
FLAG_KEYS = {
    "seed": "seed", "epochs": "epochs", "device": "device", "lr": "optim.lr", "optimizer": "optim.name",
    "max_norm": "optim.max_norm", "warmup_epochs": "schedule.warmup_epochs", "schedule": "schedule.kind",
    "norm": "model.norm", "init": "model.init", "width": "model.width", "depth": "model.depth",
    "batch_size": "data.batch_size", "train_subset": "data.train_subset", "test_subset": "data.test_subset",
    "data_dir": "data.data_dir", "precision": "compute.precision",
}


class ConfigError(ValueError):
    """A configuration value or key is invalid."""


@dataclass
class ModelConfig:
    norm: Literal["none", "batch", "layer"] = "none"
    init: Literal["kaiming", "default"] = "kaiming"
    width: float = 1.0  # channel multiplier on 32-64-128
    depth: int = 3  # number of conv blocks


@dataclass
class OptimConfig:
    name: Literal["adam", "adamw", "sgd"] = "adam"
    lr: float = 1e-3  # peak learning rate (lr_max)
    weight_decay: float = 0.0
    momentum: float = 0.9  # SGD only
    max_norm: float | None = None  # total-norm gradient clipping; None = off


@dataclass
class ScheduleConfig:
    kind: Literal["cosine", "constant"] = "cosine"
    warmup_epochs: float = 0.0  # linear warmup length; 0 = none
    lr_min: float = 1e-6  # cosine floor (the seed's value)


@dataclass
class DataConfig:
    data_dir: str = "data"
    batch_size: int = 128
    train_subset: int | None = None  # first N training images; None = all 60k
    test_subset: int | None = None  # first N test images; None = all 10k


MAX_FLUSH_EVERY = 10_000  # monitor.flush_every's ceiling: the monitor allocates that many steps of buffers up front


@dataclass
class MonitorConfig:
    layer_every: int = 50  # per-layer grad norms every N steps
    snapshot_steps: list[int] = field(default_factory=lambda: [100, 500, 2000])
    flush_every: int = 25  # steps between host syncs / metric batches
    diverge_factor: float = 10.0  # diverged if loss > factor * initial loss (or non-finite)


STACKED_CONVS = ("auto", "gemm", "hybrid", "grouped", "fused")  # compute.stacked_conv's names (cookbook.stacked.block_convs)
BLOCK_CONVS = ("gemm", "grouped", "fused")  # what one conv block's stacked conv can be, as in "fused+grouped+grouped"


@dataclass
class ComputeConfig:
    precision: Literal["fp32", "bf16"] = "fp32"  # bf16 = autocast for forward and loss; weights and optimizer stay fp32
    channels_last: bool = True  # NHWC activations: faster convs, norms and pools on CPU (same maths)
    deterministic: bool = True  # CUDA: deterministic kernels only, so a seed gives bit-identical histories on one card
    cuda_graphs: bool = True  # CUDA: replay the training step as one CUDA graph (a small CNN is launch-bound)
    stacked_conv: str = "auto"  # stacked members' convs: a STACKED_CONVS name, or BLOCK_CONVS per conv block joined by '+'
    fused_norm: bool = False  # CUDA: norm + pool + ReLU as cookbook.fused_norm's Triton kernels (not yet timed on a card)


@dataclass
class Config:
    name: str = "custom"
    description: str = ""
    seed: int = 0
    epochs: int = 5
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    data: DataConfig = field(default_factory=DataConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    compute: ComputeConfig = field(default_factory=ComputeConfig)


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Return value converted to the type hint, or raise ConfigError naming it."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # X | None
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null")):
            return None
        return _coerce(value, next(a for a in args if a is not type(None)), where)
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}={value!r} is not valid; choose one of: {', '.join(args)}")
        return value
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}={value!r} must be a list")
        return [_coerce(v, args[0], f"{where}[]") for v in value]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}={value!r} must be true or false")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}={value!r} must be an integer")
        return value
    if hint is float:
        # numeric strings too: params logged by earlier versions, read as YAML 1.1, held "1e-3" as a string
        try:
            if isinstance(value, bool):
                raise TypeError
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{where}={value!r} must be a number") from None
        if not math.isfinite(number):
            raise ConfigError(f"{where}={value!r} must be a finite number")
        return number
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}={value!r} must be a string")
        return value
    raise TypeError(f"unsupported type hint {hint} at {where}")


def merge(obj: Any, updates: dict, where: str = "") -> Any:
    """Return a copy of dataclass obj with updates (a nested dict) applied; unknown keys are errors."""
    if not isinstance(updates, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {updates!r}")
    hints = typing.get_type_hints(type(obj))
    names = [f.name for f in dataclasses.fields(obj)]
    changes = {}
    for key, value in updates.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key '{path}'; valid keys: {', '.join(names)}")
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current):
            changes[key] = merge(current, value, path)
        else:
            changes[key] = _coerce(value, hints[key], path)
    return dataclasses.replace(obj, **changes)


def stacked_conv_ok(value: str, depth: int) -> bool:
    """A compute.stacked_conv name, or one block conv for each of the model's depth conv blocks joined by '+'."""
    blocks = value.split("+")
    return value in STACKED_CONVS or (len(blocks) == depth and all(b in BLOCK_CONVS for b in blocks))


def validate(cfg: Config) -> Config:
    """Raise ConfigError for values that are well-typed but meaningless; return cfg."""
    train_size = cfg.data.train_subset or TRAIN_SIZE
    checks = [
        (cfg.optim.lr > 0 and math.isfinite(cfg.optim.lr), "optim.lr", cfg.optim.lr, "must be a positive number"),
        (cfg.epochs >= 1, "epochs", cfg.epochs, "must be >= 1"),
        (0 <= cfg.seed < 2**64, "seed", cfg.seed, "must be in 0..2**64-1 (torch's seeds; a negative one aliases one of them)"),
        (0 < 128 * cfg.model.width < math.inf, "model.width", cfg.model.width, "must be a finite number > 0"),
        (1 <= cfg.model.depth <= 5, "model.depth", cfg.model.depth, "must be in 1..5 (28x28 input)"),
        (cfg.optim.max_norm is None or cfg.optim.max_norm > 0, "optim.max_norm", cfg.optim.max_norm, "must be > 0 or none"),
        (cfg.optim.weight_decay >= 0, "optim.weight_decay", cfg.optim.weight_decay, "must be >= 0"),
        (0 <= cfg.optim.momentum < 1, "optim.momentum", cfg.optim.momentum, "must be in [0, 1)"),
        (0 <= cfg.schedule.warmup_epochs <= cfg.epochs, "schedule.warmup_epochs", cfg.schedule.warmup_epochs,
         "must be in [0, epochs] (a longer warmup never reaches optim.lr)"),
        (0 <= cfg.schedule.lr_min <= cfg.optim.lr, "schedule.lr_min", cfg.schedule.lr_min, "must be in [0, optim.lr]"),
        (cfg.data.batch_size >= 1, "data.batch_size", cfg.data.batch_size, "must be >= 1"),
        (not (cfg.model.norm == "batch" and cfg.model.depth == 5 and 1 in (cfg.data.batch_size, train_size % cfg.data.batch_size)),
         "data.batch_size", cfg.data.batch_size, f"leaves a batch of 1 image of {train_size}: BatchNorm at depth 5 sees a "
         "1x1 map, one value per channel"),
        (cfg.data.train_subset is None or 2 <= cfg.data.train_subset <= TRAIN_SIZE, "data.train_subset", cfg.data.train_subset,
         f"must be in 2..{TRAIN_SIZE} (MNIST's training images) or none"),
        (cfg.data.test_subset is None or 1 <= cfg.data.test_subset <= TEST_SIZE, "data.test_subset", cfg.data.test_subset,
         f"must be in 1..{TEST_SIZE} (MNIST's test images) or none"),
        (cfg.monitor.layer_every >= 1, "monitor.layer_every", cfg.monitor.layer_every, "must be >= 1"),
        (1 <= cfg.monitor.flush_every <= MAX_FLUSH_EVERY, "monitor.flush_every", cfg.monitor.flush_every,
         f"must be in 1..{MAX_FLUSH_EVERY} (its buffers are allocated up front)"),
        (all(s >= 0 for s in cfg.monitor.snapshot_steps), "monitor.snapshot_steps", cfg.monitor.snapshot_steps,
         "must be steps >= 0"),
        (cfg.monitor.diverge_factor > 1, "monitor.diverge_factor", cfg.monitor.diverge_factor, "must be > 1"),
        (cfg.device == "auto" or cfg.device in ("cpu", "mps") or cfg.device.split(":")[0] == "cuda",
         "device", cfg.device, "must be one of auto, cpu, cuda, cuda:N, mps"),
        (stacked_conv_ok(cfg.compute.stacked_conv, cfg.model.depth), "compute.stacked_conv", cfg.compute.stacked_conv,
         f"must be one of {', '.join(STACKED_CONVS)}, or one of {', '.join(BLOCK_CONVS)} for each of the {cfg.model.depth} "
         f"conv blocks joined by '+', like {'+'.join(['fused'] + ['grouped'] * (cfg.model.depth - 1))}"),
    ]
    for ok, name, value, rule in checks:
        if not ok:
            raise ConfigError(f"{name}={value!r} {rule}")
    for name, value in to_params(cfg).items():
        if len(value) > MAX_PARAM_CHARS:  # MLflow would store it cut short, and `reproduce` could not read it back
            raise ConfigError(f"{name.removeprefix(PARAM_PREFIX)} is {len(value)} characters as an MLflow param; "
                              f"at most {MAX_PARAM_CHARS} are stored")
    return cfg


def available_configs(configs_dir: Path) -> list[str]:
    """Names of the config files in configs_dir."""
    return sorted(p.stem for p in Path(configs_dir).glob("*.yaml"))


def load_config(name_or_path: str, configs_dir: Path, overrides: dict | None = None) -> Config:
    """Resolve defaults <- config file <- overrides (nested dict) into a validated Config."""
    return validate(merge(file_config(name_or_path, configs_dir), overrides or {}))


def file_config(name_or_path: str, configs_dir: Path) -> Config:
    """Defaults <- config file, as written: not validated (the overrides given with it may be what makes it valid)."""
    path = Path(name_or_path)
    if path.suffix not in (".yaml", ".yml"):
        path = Path(configs_dir) / f"{name_or_path}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown config '{name_or_path}'; available: {', '.join(available_configs(configs_dir))}")
    try:
        data = load_yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e.__class__.__name__})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.object[e.start]:#x} at offset {e.start})") from None
    return merge(Config(name=path.stem), data, where="")


def flatten(cfg: Any, prefix: str = "") -> dict[str, Any]:
    """Dotted-key view of a (nested) dataclass, e.g. {'optim.lr': 0.001}."""
    out = {}
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        out.update(flatten(value, key + ".") if dataclasses.is_dataclass(value) else {key: value})
    return out


def overridden_keys(cfg: Config, base: Config) -> list[str]:
    """Dotted keys whose value in cfg differs from base (its config file as written): what a run changed."""
    ours, theirs = flatten(cfg), flatten(base)
    return sorted(k for k in ours if ours[k] != theirs[k])


def unflatten(flat: dict[str, Any]) -> dict:
    """Inverse of flatten: {'optim.lr': x} -> {'optim': {'lr': x}}; a key set both as a value and as a section
    ('optim.lr' and 'optim.lr.x') is a one-line ConfigError."""
    nested: dict = {}
    for key, value in flat.items():
        *parents, leaf = key.split(".")
        node = nested
        for depth, p in enumerate(parents):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"'{key}' sets a key inside '{'.'.join(parents[:depth + 1])}', which is set to {node!r}")
        if isinstance(node.get(leaf), dict):
            raise ConfigError(f"'{key}' is set to {value!r} and also has keys set inside it")
        node[leaf] = value
    return nested


def flag_overrides(values: dict[str, Any]) -> dict:
    """Nested config overrides from {flag: value}; None and "" mean "as the config file says"."""
    return unflatten({FLAG_KEYS[flag]: v for flag, v in values.items() if v not in (None, "")})


def to_yaml(cfg: Config) -> str:
    """The fully resolved config as YAML."""
    return yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False)


# MLflow params of the resolved config are prefixed: `mlflow run` logs its raw MLproject
# parameters (seed='' ...) as params too, and a param value can never change once logged.
PARAM_PREFIX = "config."
MAX_PARAM_CHARS = 6000  # MLflow's longest param value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH; tested equal)


def to_params(cfg: Config) -> dict[str, str]:
    """The resolved config as MLflow params: {'config.optim.lr': '0.001', ...}."""
    return {PARAM_PREFIX + k: dump_yaml(v) for k, v in flatten(cfg).items()}


def from_params(params: dict[str, str]) -> Config:
    """Rebuild a Config from the MLflow params written by to_params (other params are ignored)."""
    parsed = {k.removeprefix(PARAM_PREFIX): load_yaml(v) for k, v in params.items() if k.startswith(PARAM_PREFIX)}
    return validate(merge(Config(), unflatten(parsed)))
