"""The fused BatchNorm + max-pool + ReLU kernels, run by Triton's CPU interpreter: PyTorch's three ops, forward and backward."""
import dataclasses
import os

import pytest
import torch
import torch.nn.functional as F
from test_stacked import assert_same_history, separate_and_stacked
from torch import nn

from cookbook.config import ConfigError, merge, validate
from cookbook.model import StableNet
from cookbook.resources import fused_needs_cuda


@pytest.fixture
def fused():
    """cookbook.fused_norm with its kernels run by Triton's interpreter, which conftest turns on where no GPU is visible."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's CPU interpreter (tests/test_gpu.py checks the kernels on a card)")
    from cookbook import fused_norm
    return fused_norm


def reference(x, weight, bias, running_mean, running_var, pool):
    """PyTorch's BatchNorm (batch statistics), max-pool and ReLU on x [B, H, W, C]."""
    y = F.batch_norm(x.permute(0, 3, 1, 2), running_mean, running_var, weight, bias, True, 0.1, 1e-5)
    return F.relu(F.max_pool2d(y, pool) if pool > 1 else y).permute(0, 2, 3, 1)


# (B, H, W, C, pool): one tile; odd sides (a last row and column no window pools) and more channels than one block;
# no pool (the last block); 600 rows, so each statistics chunk merges several tiles and the last chunk is short;
# a mean far from 0 (a one-pass sum of squares would lose the variance).
SHAPES = [(2, 4, 4, 3, 2, 0.0), (2, 5, 7, 70, 2, 0.0), (3, 3, 3, 5, 1, 0.0), (4, 10, 15, 5, 2, 0.0), (2, 6, 6, 4, 2, 1e4)]


@pytest.mark.parametrize("shape", SHAPES)
def test_output_running_statistics_and_gradients_equal_pytorchs_in_float64(shape, fused):
    b, h, w, c, pool, offset = shape
    torch.manual_seed(0)
    x = (torch.randn(b, h, w, c, dtype=torch.float64) * 3 + offset).requires_grad_()
    weight = torch.randn(c, dtype=torch.float64, requires_grad=True)  # some negative: the max is then the smallest x
    bias = torch.randn(c, dtype=torch.float64, requires_grad=True)
    stats = [torch.randn(c, dtype=torch.float64), torch.rand(c, dtype=torch.float64) + 0.5]
    want_stats = [s.clone() for s in stats]
    got = fused.BatchNormPoolReLUFunction.apply(x, weight, bias, *stats, 0.1, 1e-5, pool)
    want = reference(x, weight, bias, *want_stats, pool)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for s, t in zip(stats, want_stats):
        torch.testing.assert_close(s, t, rtol=1e-12, atol=1e-12)
    grad = torch.randn_like(want)
    for g, v in zip(torch.autograd.grad(got, [x, weight, bias], grad), torch.autograd.grad(want, [x, weight, bias], grad)):
        torch.testing.assert_close(g, v, rtol=1e-9, atol=1e-9)


def test_bfloat16_maps_give_pytorchs_output_rounded_and_a_nan_stays_nan(fused):
    torch.manual_seed(0)
    x = torch.randn(2, 6, 6, 8).bfloat16()
    weight, bias, stats = torch.randn(8), torch.randn(8), [torch.zeros(8), torch.ones(8)]
    got = fused.BatchNormPoolReLUFunction.apply(x, weight, bias, *stats, 0.1, 1e-5, 2)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference(x.float(), weight, bias, torch.zeros(8), torch.ones(8), 2),
                               rtol=1e-2, atol=1e-2)
    x[0, 0, 0, 3] = float("nan")  # a diverged map: its channel's statistics and every output of the channel are NaN
    got = fused.BatchNormPoolReLUFunction.apply(x, weight, bias, *stats, 0.1, 1e-5, 2)
    assert got[..., 3].isnan().all() and not got[..., [0, 1, 2, 4]].isnan().any()


def test_fusing_replaces_each_batchnorm_pool_relu_and_keeps_every_parameter_name(fused):
    net = StableNet(norm="batch", depth=3)
    layers = fused.fuse_norms(list(net.features))
    kinds = [type(m).__name__ for m in layers]
    assert kinds == ["Conv2d", "FusedBatchNormPoolReLU", "Identity", "Identity"] * 2 + \
        ["Conv2d", "FusedBatchNormPoolReLU", "Identity", "GlobalAvgPool"]
    assert [m.pool for m in layers if isinstance(m, fused.FusedBatchNormPoolReLU)] == [2, 2, 1]
    names = lambda ms: [n for n, _ in nn.Sequential(*ms).named_parameters()]  # noqa: E731
    assert names(layers) == names(net.features)
    plain = list(StableNet(norm="none").features)
    assert fused.fuse_norms(plain) == plain


def test_each_stacked_member_equals_its_separate_run_in_float64(tiny_cfg, float64, fused, monkeypatch):
    calls = []
    monkeypatch.setattr(fused, "batch_stats", lambda x, stats=fused.batch_stats: calls.append(x.shape) or stats(x))
    cfg = validate(merge(tiny_cfg, {"epochs": 1, "data": {"train_subset": 16, "batch_size": 8}, "model": {"norm": "batch"},
                                    "compute": {"stacked_norm": "fused"}}))  # two steps: the interpreter is slow
    data = dataclasses.replace(float64, train_x=float64.train_x[:16], train_y=float64.train_y[:16])
    stacked, alone = separate_and_stacked(cfg, data)
    for (result, history), (want, want_history) in zip(stacked, alone):
        assert_same_history(history, want_history, rel=1e-9)
        assert (result.steps_run, result.diverged) == (want.steps_run, want.diverged)
    assert len(calls) == 2 * 3 and calls[0] == (8, 28, 28, 3 * 32)  # 2 steps x 3 blocks, the members' channels stacked


def test_fused_norm_off_cuda_without_the_interpreter_is_a_config_error(tiny_cfg, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cfg = validate(merge(tiny_cfg, {"model": {"norm": "batch"}, "compute": {"stacked_norm": "fused"}}))
    with pytest.raises(ConfigError, match="compute.stacked_norm='fused' runs Triton kernels on a CUDA GPU, not on cpu"):
        fused_needs_cuda(cfg, torch.device("cpu"))
