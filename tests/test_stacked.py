"""K seeds trained as one stacked model: each member equals the separate run with its seed."""
import dataclasses

import pandas as pd
import pytest
import torch
from torch import nn

from benchmarks.kernel_speed import fastest_blocks
from cookbook.config import merge, validate
from cookbook.hooks import Recorder
from cookbook.model import build_model
from cookbook.stacked import StackedStableNet, block_convs, conv_kind, train_stacked
from cookbook.stacked_conv import StackedConv2d
from cookbook.train import train

SEEDS = (0, 1, 2)


def separate_and_stacked(cfg, data):
    cfgs = [dataclasses.replace(cfg, seed=s) for s in SEEDS]
    members = [Recorder() for _ in cfgs]
    stacked = train_stacked(cfgs, data, [[r] for r in members])
    alone = []
    for c in cfgs:
        rec = Recorder()
        alone.append((train(c, data, [rec]), rec.history))
    return list(zip(stacked, [r.history for r in members])), alone


def assert_same_history(got, want, rel, abs=1e-6):
    assert set(got) == set(want)
    for key, series in want.items():
        if key.startswith("time/"):
            continue
        assert [s for s, _ in got[key]] == [s for s, _ in series], key
        # abs: a conv bias followed by BatchNorm has a true gradient of 0; its logged norm is rounding noise
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in series], rel=rel, abs=abs), key


@pytest.mark.parametrize("norm,conv", [(norm, conv) for conv in ("grouped", "gemm") for norm in ("batch", "layer", "none")]
                         + [("none", "grouped+gemm+grouped")])  # a kind per conv block
def test_each_member_equals_its_separate_run_in_float64(norm, conv, tiny_cfg, float64):
    cfg = validate(merge(tiny_cfg, {"model": {"norm": norm}, "optim": {"max_norm": 0.5}, "compute": {"stacked_conv": conv}}))
    stacked, alone = separate_and_stacked(cfg, float64)
    for (result, history), (want, want_history) in zip(stacked, alone):
        assert_same_history(history, want_history, rel=1e-9)
        assert (result.steps_run, result.diverged, result.param_count) == (want.steps_run, want.diverged, want.param_count)
        assert [(r["step"], r["param"], r["numel"]) for r in result.snapshots] == \
               [(r["step"], r["param"], r["numel"]) for r in want.snapshots]


def test_members_match_in_float32_and_differ_from_each_other(tiny_cfg, tiny_data):
    cfg = validate(merge(tiny_cfg, {"model": {"norm": "batch"}, "optim": {"max_norm": 1.0}}))
    stacked, alone = separate_and_stacked(cfg, tiny_data)
    for (_, history), (_, want) in zip(stacked, alone):
        assert [v for _, v in history["train/loss"]] == pytest.approx([v for _, v in want["train/loss"]], rel=3e-3)
        assert [v for _, v in history["test/acc"]] == pytest.approx([v for _, v in want["test/acc"]], abs=0.011)
    assert stacked[0][1]["train/loss"] != stacked[1][1]["train/loss"]


def test_diverging_members_stop_as_separate_runs_do(tiny_cfg, tiny_data):
    cfg = validate(merge(tiny_cfg, {"optim": {"name": "sgd", "lr": 50.0}, "schedule": {"warmup_epochs": 0}}))
    stacked, alone = separate_and_stacked(cfg, tiny_data)
    for (result, history), (want, want_history) in zip(stacked, alone):
        assert result.diverged and (result.diverged_step, result.steps_run) == (want.diverged_step, want.steps_run)
        assert [s for s, _ in history["train/loss"]] == [s for s, _ in want_history["train/loss"]]


def test_members_must_differ_only_in_seed(tiny_cfg, tiny_data):
    other = merge(tiny_cfg, {"optim": {"lr": 0.01}})
    with pytest.raises(ValueError, match="differ only in seed"):
        train_stacked([tiny_cfg, other], tiny_data, [[], []])


@pytest.mark.parametrize("conv,kinds", [("hybrid", ["gemm", "grouped", "grouped"]), ("gemm", ["gemm"] * 3),
                                        ("grouped+fused+gemm", ["grouped", "fused", "gemm"])])
def test_block_convs_gives_each_conv_block_its_kind(conv, kinds):
    assert block_convs(conv, 3) == kinds


@pytest.mark.parametrize("setting,device,kind", [("auto", "cuda", "fused"), ("auto", "cpu", "grouped"), ("hybrid", "cuda", "hybrid")])
def test_auto_is_the_measured_fastest_kind_on_each_device(setting, device, kind):
    assert conv_kind(setting, torch.device(device)) == kind


def test_stacked_model_builds_each_conv_block_as_its_kind(tiny_cfg):
    members = [build_model(tiny_cfg.model) for _ in SEEDS]
    convs = [m for m in StackedStableNet(members, "gemm+grouped+gemm").features if isinstance(m, (nn.Conv2d, StackedConv2d))]
    assert [type(m) for m in convs] == [StackedConv2d, nn.Conv2d, StackedConv2d] and convs[1].groups == len(SEEDS)


def test_fastest_blocks_takes_each_conv_blocks_fastest_channels_last_kind():
    rows = [("conv 1->32 @28", "grouped", 9.2), ("conv 1->32 @28", "gemm", 5.4), ("conv 1->32 @28", "fused", 2.0),
            ("LayerNorm 32 @28", "group_norm", 0.1),
            ("conv 32->64 @14", "grouped", 5.2), ("conv 32->64 @14", "grouped-nchw", 4.3), ("conv 32->64 @14", "gemm", 8.5),
            ("conv 64->128 @7", "grouped", 3.9), ("conv 64->128 @7", "gemm", 3.8)]  # as kernel_speed writes it (no fused off CUDA)
    table = pd.DataFrame(rows, columns=["layer", "variant", "ms"])
    assert fastest_blocks(table) == "fused+grouped+gemm"  # NCHW is the whole model's layout, not a block's


@pytest.mark.parametrize("content", [None, "layer,variant,ms\nLayerNorm 32 @28,group_norm,0.1\n", "a,b\n1,2\n"])
def test_fastest_of_a_missing_or_foreign_table_is_one_line(content, tmp_path, capsys):
    from benchmarks.kernel_speed import main
    path = tmp_path / "table.csv"
    if content is not None:
        path.write_text(content)
    assert main(["--fastest", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: --fastest '{path}' is not a kernel_speed table") and err.count("\n") == 1
