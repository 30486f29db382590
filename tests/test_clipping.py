import math

import pytest
import torch

from cookbook.clipping import clip_factor, clip_gradients, is_diverged


def params_with_grads(scale, seed=0):
    g = torch.Generator().manual_seed(seed)
    ps = [torch.nn.Parameter(torch.zeros(s)) for s in [(3, 4), (5,), (2, 2, 2)]]
    for p in ps:
        p.grad = torch.randn(p.shape, generator=g) * scale
    return ps


def total_norm(ps):
    return math.sqrt(sum(float((p.grad.double() ** 2).sum()) for p in ps))


@pytest.mark.parametrize("scale,max_norm", [(10.0, 1.0), (0.01, 1.0), (1.0, 0.5), (1.0, None)])
def test_clip_matches_torch_clip_grad_norm(scale, max_norm):
    """Our clipping against the closed form g * min(1, max_norm / (||g|| + eps)), computed here in float64."""
    ours, original = params_with_grads(scale), params_with_grads(scale)
    before = total_norm(ours)
    pre = clip_gradients(ours, max_norm)
    assert float(pre) == pytest.approx(before, rel=1e-6)  # the norm BEFORE clipping is what we report
    factor = 1.0 if max_norm is None else min(1.0, max_norm / (before + 1e-6))
    for a, b in zip(ours, original):
        torch.testing.assert_close(a.grad.double(), b.grad.double() * factor, rtol=1e-6, atol=0)
    assert clip_factor(before, max_norm) == pytest.approx(factor, rel=1e-12)


def test_clip_factor_closed_form():
    assert clip_factor(0.5, 1.0) == 1.0
    assert clip_factor(4.0, 1.0) == pytest.approx(0.25, rel=1e-6)
    assert clip_factor(1e9, None) == 1.0
    assert clip_factor(1.0, 1.0) < 1.0  # torch's eps: a norm exactly at max_norm is scaled by 1/(1+1e-6)
    members = clip_factor(torch.tensor([0.5, 4.0, 1e9], dtype=torch.float64), 1.0)  # stacked runs: one per member
    torch.testing.assert_close(members, torch.tensor([1.0, 1 / (4 + 1e-6), 1 / (1e9 + 1e-6)], dtype=torch.float64))


def test_divergence_rule():
    assert not is_diverged(2.3, 2.3, 10.0)
    assert not is_diverged(23.0, 2.3, 10.0)  # exactly factor x initial is still converging
    assert is_diverged(23.1, 2.3, 10.0)
    assert is_diverged(float("nan"), 2.3, 10.0)
    assert is_diverged(float("inf"), 2.3, 10.0)
