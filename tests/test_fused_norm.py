"""The fused BatchNorm + max-pool + ReLU kernels, run by Triton's CPU interpreter: PyTorch's three ops, forward and backward."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from test_stacked import assert_same_history
from torch import nn

from cookbook.config import ConfigError, merge, validate
from cookbook.hooks import Recorder
from cookbook.logged import save_model
from cookbook.model import StableNet
from cookbook.resources import fused_needs_cuda
from cookbook.stacked import train_stacked
from cookbook.train import train


@pytest.fixture
def fused():
    """cookbook.fused_norm with its kernels run by Triton's interpreter, which conftest turns on where no GPU is visible."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's CPU interpreter (tests/test_gpu.py checks the kernels on a card)")
    from cookbook import fused_norm
    return fused_norm


def group_norm(x, groups, weight, bias):
    """F.group_norm's maths with a two-pass variance: PyTorch's CPU kernel takes E[x^2] - E[x]^2, 1e-8 off in float64
    at a mean of 1e4 (the kernels under test: 1e-12)."""
    b, c, h, w = x.shape
    per_group = x.reshape(b, groups, -1)
    centred = per_group - per_group.mean(-1, keepdim=True)
    xhat = (centred / (centred.square().mean(-1, keepdim=True) + 1e-5).sqrt()).view(b, c, h, w)
    return xhat * weight[:, None, None] + bias[:, None, None]


def reference(x, weight, bias, stats, pool, groups):
    """BatchNorm (batch statistics; groups 0) or GroupNorm, then max-pool and ReLU, on x [B, H, W, C], by PyTorch."""
    nchw = x.permute(0, 3, 1, 2)
    y = group_norm(nchw, groups, weight, bias) if groups else F.batch_norm(nchw, *stats, weight, bias, True, 0.1, 1e-5)
    return F.relu(F.max_pool2d(y, pool) if pool > 1 else y).permute(0, 2, 3, 1)


def fused_call(fused, x, weight, bias, stats, pool, groups, out_dtype=None):
    args = (*(stats if not groups else (None, None)), 0.1, 1e-5, pool, groups, out_dtype or x.dtype)
    return fused.NormPoolReLUFunction.apply(x, weight, bias, *args)


# (B, H, W, C, pool, offset, groups): one tile; odd sides (a last row and column no window pools) and more channels
# than one block; no pool (the last block); an image of 150 pixels (several tiles a program); a mean far from 0 (a
# one-pass sum of squares would lose the variance); GroupNorm(1, C) (the seed's LayerNorm) and GroupNorm(K, K*C)
# (K=3 stacked members' LayerNorm), pooled and not.
SHAPES = [(2, 4, 4, 3, 2, 0.0, 0), (2, 5, 7, 70, 2, 0.0, 0), (3, 3, 3, 5, 1, 0.0, 0), (4, 10, 15, 5, 2, 0.0, 0),
          (2, 6, 6, 4, 2, 1e4, 0), (2, 5, 7, 6, 2, 0.0, 1), (3, 6, 6, 12, 2, 1e4, 3), (2, 3, 3, 70, 1, 0.0, 2)]


@pytest.mark.parametrize("shape", SHAPES)
def test_output_running_statistics_and_gradients_equal_pytorchs_in_float64(shape, fused):
    b, h, w, c, pool, offset, groups = shape
    torch.manual_seed(0)
    x = (torch.randn(b, h, w, c, dtype=torch.float64) * 3 + offset).requires_grad_()
    weight = torch.randn(c, dtype=torch.float64, requires_grad=True)  # some negative: the max is then the smallest x
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    stats = [torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5]
    want_stats = [s.clone() for s in stats]
    got = fused_call(fused, x, weight, bias, stats, pool, groups)
    want = reference(x, weight, bias, want_stats, pool, groups)
    if groups and not offset:  # the reference's GroupNorm is PyTorch's
        torch.testing.assert_close(group_norm(x.permute(0, 3, 1, 2), groups, weight, bias),
                                   F.group_norm(x.permute(0, 3, 1, 2), groups, weight, bias, 1e-5), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for s, t in zip(stats, want_stats):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    for g, v in zip(torch.autograd.grad(got, [x, weight, bias], grad), torch.autograd.grad(want, [x, weight, bias], grad)):
        torch.testing.assert_close(g, v, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("groups", [0, 2])
def test_bfloat16_maps_give_pytorchs_output_rounded_and_a_nan_stays_nan(groups, fused):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6, 8).bfloat16()
    weight, bias, stats = torch.randn(8), torch.randn(8), [torch.zeros(8), torch.ones(8)]
    got = fused_call(fused, x, weight, bias, stats, 2, groups)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference(x.float(), weight, bias, [torch.zeros(8), torch.ones(8)], 2, groups),
                               rtol=1e-2, atol=1e-2)
    x[0, 0, 0, 3] = float("nan")  # a diverged map: NaN in every output its statistics reach, nowhere else
    got = fused_call(fused, x, weight, bias, stats, 2, groups)
    reach = got[..., 3] if not groups else got[0, ..., :4]  # BatchNorm: the channel; GroupNorm: the image's group
    assert reach.isnan().all() and got.isnan().sum() == reach.numel()


def test_fusing_runs_each_norm_pool_relu_through_the_kernels_and_keeps_modules_names_and_state(fused):
    for norm in ("batch", "layer"):
        net = StableNet(norm=norm, depth=3)
        features = fused.FusedNormSequential(net.features)
        assert features.runs == {1: (2, 4), 5: (2, 8), 9: (1, 11)}  # two pooled blocks, the last one without a pool
        assert features.state_dict().keys() == net.features.state_dict().keys()
        assert type(features.plain()) is nn.Sequential and list(features.plain()) == list(net.features)
    assert fused.FusedNormSequential(StableNet(norm="none").features).runs == {}


@pytest.mark.parametrize("norm,stacked", [("batch", True), ("layer", False)])
def test_training_through_the_kernels_equals_pytorchs_ops_in_float64(norm, stacked, tiny_cfg, float64, fused, monkeypatch):
    """BatchNorm: two stacked members with fused_norm against their separate runs on PyTorch's ops; LayerNorm: a single
    run with and without. Two steps: the interpreter is slow."""
    calls = []
    monkeypatch.setattr(fused, "image_stats", lambda x, stats=fused.image_stats: calls.append(x.shape) or stats(x))
    plain = validate(merge(tiny_cfg, {"epochs": 1, "data": {"train_subset": 8, "batch_size": 4}, "model": {"norm": norm}}))
    cfgs = [dataclasses.replace(plain, seed=s, compute=dataclasses.replace(plain.compute, fused_norm=True))
            for s in ((0, 1) if stacked else (0,))]
    data = dataclasses.replace(float64, train_x=float64.train_x[:8], train_y=float64.train_y[:8])
    got = [Recorder() for _ in cfgs]
    if stacked:
        train_stacked(cfgs, data, [[r] for r in got])
    else:
        for cfg, rec in zip(cfgs, got):
            train(cfg, data, [rec])
    for cfg, rec in zip(cfgs, got):
        want = Recorder()
        train(dataclasses.replace(cfg, compute=plain.compute), data, [want])
        assert_same_history(rec.history, want.history, rel=1e-9)
    assert len(calls) == 2 * 3 and calls[0] == (4, 28, 28, len(cfgs) * 32)  # 2 steps x 3 blocks, members stacked


@pytest.mark.parametrize("norm", ["batch", "layer"])
def test_under_autocast_the_output_dtype_is_the_one_pytorchs_ops_give(norm, fused):
    features = StableNet(norm=norm).features[:4]  # conv, norm, pool, ReLU
    x = torch.randn(2, 1, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert fused.FusedNormSequential(features)(x).dtype == features(x).dtype == torch.bfloat16  # the CPU's rules
    assert fused.group_norm_dtype("cpu", torch.bfloat16, torch.bfloat16) == torch.bfloat16
    assert fused.group_norm_dtype("cpu", torch.float32, None) == torch.float32


def test_a_model_trained_through_the_kernels_is_logged_as_the_plain_network(tmp_path, monkeypatch, fused):
    import mlflow.pytorch
    monkeypatch.chdir(tmp_path)
    net = StableNet(norm="layer")
    net.features = fused.FusedNormSequential(net.features)
    loaded = mlflow.pytorch.load_model(str(save_model(net, "run")))
    assert type(loaded.features) is nn.Sequential and loaded.state_dict().keys() == net.state_dict().keys()


def test_fused_norm_off_cuda_without_the_interpreter_is_a_config_error(tiny_cfg, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = validate(merge(tiny_cfg, {"model": {"norm": "batch"}, "compute": {"fused_norm": True}}))
    with pytest.raises(ConfigError, match="compute.fused_norm=true runs Triton kernels on a CUDA GPU, not on cpu; set it false"):
        fused_needs_cuda(cfg, torch.device("cpu"))
