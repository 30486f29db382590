import re

import pytest

from conftest import CONFIGS_DIR
from cookbook.config import (
    MAX_PARAM_CHARS,
    Config,
    ConfigError,
    available_configs,
    from_params,
    load_config,
    merge,
    overridden_keys,
    to_params,
    validate,
)


def test_seed_configs_exist_with_their_semantics():
    assert {"no_tricks", "batchnorm", "layernorm", "all_tricks"} <= set(available_configs(CONFIGS_DIR))
    cfgs = {n: load_config(n, CONFIGS_DIR) for n in ["no_tricks", "batchnorm", "layernorm", "all_tricks"]}
    assert [cfgs[n].model.norm for n in cfgs] == ["none", "batch", "layer", "batch"]
    assert [cfgs[n].schedule.warmup_epochs for n in cfgs] == [0, 0, 0, 1]
    assert [cfgs[n].optim.max_norm for n in cfgs] == [None, None, None, 1.0]
    assert all(c.schedule.kind == "cosine" and c.optim.lr == 1e-3 and c.optim.name == "adam" for c in cfgs.values())
    assert all(c.description for c in cfgs.values())


def test_config_file_sets_only_differences():
    text = (CONFIGS_DIR / "batchnorm.yaml").read_text()
    assert "lr" not in text and "epochs" not in text


def test_unknown_config_lists_available():
    with pytest.raises(ConfigError, match="unknown config 'nope'; available: all_tricks, batchnorm"):
        load_config("nope", CONFIGS_DIR)


def test_unknown_key_and_wrong_type_are_errors(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  nrom: batch\n")
    with pytest.raises(ConfigError, match="unknown key 'model.nrom'; valid keys: norm, init, width, depth"):
        load_config(str(bad), CONFIGS_DIR)
    bad.write_text("epochs: five\n")
    with pytest.raises(ConfigError, match="epochs='five' must be an integer"):
        load_config(str(bad), CONFIGS_DIR)
    bad.write_text("model:\n  norm: instance\n")
    with pytest.raises(ConfigError, match="model.norm='instance' is not valid; choose one of: none, batch, layer"):
        load_config(str(bad), CONFIGS_DIR)


def test_yaml_exponent_strings_are_numbers():
    assert merge(Config(), {"optim": {"lr": "1e-3"}}).optim.lr == 1e-3
    assert merge(Config(), {"optim": {"max_norm": "none"}}).optim.max_norm is None


@pytest.mark.parametrize("updates,message", [
    ({"optim": {"lr": 0}}, "optim.lr=0.0 must be a positive number"),
    ({"optim": {"lr": -1}}, "optim.lr=-1.0 must be a positive number"),
    ({"optim": {"lr": "nan"}}, "optim.lr='nan' must be a finite number"),
    ({"epochs": 0}, "epochs=0 must be >= 1"),
    ({"model": {"width": -0.5}}, "model.width=-0.5 must be a finite number > 0"),
    ({"model": {"width": 1e308}}, "model.width=1e+308 must be a finite number > 0"),  # 128 x width channels: inf
    ({"model": {"norm": "batch", "depth": 5}, "data": {"batch_size": 1}}, "data.batch_size=1 leaves a batch of 1 image"),
    ({"model": {"norm": "batch", "depth": 5}, "data": {"train_subset": 33, "batch_size": 32}},
     "data.batch_size=32 leaves a batch of 1 image of 33: BatchNorm at depth 5 sees a 1x1 map, one value per channel"),
    ({"model": {"depth": 9}}, "model.depth=9 must be in 1..5"),
    ({"optim": {"name": "lion"}}, "optim.name='lion' is not valid; choose one of: adam, adamw, sgd"),
    ({"model": {"init": "orthogonal"}}, "model.init='orthogonal' is not valid; choose one of: kaiming, default"),
    ({"device": "tpu"}, "device='tpu' must be one of auto, cpu"),
    ({"seed": -1}, "seed=-1 must be in 0..2**64-1"),
    ({"seed": 2**64}, "seed=18446744073709551616 must be in 0..2**64-1"),
    ({"optim": {"momentum": -0.5}}, "optim.momentum=-0.5 must be in [0, 1)"),
    ({"optim": {"momentum": 1}}, "optim.momentum=1.0 must be in [0, 1)"),
    ({"schedule": {"warmup_epochs": 6}}, "schedule.warmup_epochs=6.0 must be in [0, epochs]"),
    ({"monitor": {"flush_every": 10**9}}, "monitor.flush_every=1000000000 must be in 1..10000"),
    ({"monitor": {"snapshot_steps": [100, -1]}}, "monitor.snapshot_steps=[100, -1] must be steps >= 0"),
    ({"compute": {"stacked_conv": "im2col"}}, "compute.stacked_conv='im2col' must be one of auto, gemm, hybrid, grouped, "
     "fused, or one of gemm, grouped, fused for each of the 3 conv blocks joined by '+', like fused+grouped+grouped"),
    ({"compute": {"stacked_conv": "gemm+grouped"}}, "compute.stacked_conv='gemm+grouped' must be one of"),  # 3 blocks
    ({"compute": {"stacked_conv": "hybrid+grouped+grouped"}}, "compute.stacked_conv='hybrid+grouped+grouped' must be"),
    ({"model": {"depth": 2}, "compute": {"stacked_conv": "gemm+grouped+gemm"}}, "each of the 2 conv blocks"),
    ({"monitor": {"snapshot_steps": list(range(10**5, 10**5 + 1500))}},
     "monitor.snapshot_steps is 12298 characters as an MLflow param; at most 6000 are stored"),
    ({"description": "x" * 6001}, "description is 6001 characters as an MLflow param; at most 6000 are stored"),
])
def test_meaningless_values_name_the_value(updates, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        validate(merge(Config(), updates))


@pytest.mark.parametrize("conv", ["auto", "hybrid", "fused", "gemm+grouped+fused", "grouped+grouped+grouped"])
def test_stacked_conv_is_a_name_or_one_kind_per_conv_block(conv):
    assert validate(merge(Config(), {"compute": {"stacked_conv": conv}})).compute.stacked_conv == conv


def test_the_longest_param_is_mlflows():
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH
    assert MAX_PARAM_CHARS == MAX_PARAM_VAL_LENGTH


def test_params_round_trip_to_the_same_config():
    cfg = load_config("all_tricks", CONFIGS_DIR, {"seed": 3, "data": {"train_subset": 100}})
    params = to_params(cfg)
    assert from_params({**params, "seed": "", "lr": ""}) == cfg  # `mlflow run`'s raw params are ignored
    assert params["config.optim.max_norm"] == "1.0" and params["config.data.test_subset"] == "null"


@pytest.mark.parametrize("text", ["1e3", "08", "010", "1_000", "0x10", ".5", "+1", "true", "yes", "null", "~", "", "a: b"])
def test_a_text_value_reads_back_as_the_same_text(text):
    """PyYAML writes YAML 1.1, where '1e3' and '08' are strings it leaves plain; read as 1.2 they were numbers, and the
    run could not be reproduced or resumed ('description=1000.0 must be a string')."""
    cfg = merge(Config(), {"description": text, "data": {"data_dir": text or "data"}})
    assert from_params(to_params(cfg)) == cfg


def test_overridden_keys_are_the_values_that_differ_from_the_file():
    base = load_config("all_tricks", CONFIGS_DIR)
    same_lr = load_config("all_tricks", CONFIGS_DIR, {"optim": {"lr": 0.001}, "seed": 0})  # given, but equal to the file
    assert overridden_keys(same_lr, base) == []
    changed = load_config("all_tricks", CONFIGS_DIR, {"optim": {"lr": 0.1, "max_norm": None}, "model": {"width": 2}})
    assert overridden_keys(changed, base) == ["model.width", "optim.lr", "optim.max_norm"]
