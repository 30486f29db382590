import math

import pytest
import torch
from torch.optim.lr_scheduler import ConstantLR, CosineAnnealingLR, LinearLR, SequentialLR

from cookbook.schedule import WarmupCosineLR, lr_at, warmup_steps

LR_MAX, LR_MIN, W, T = 1e-3, 1e-6, 10, 50


def at(step, warmup=W, kind="cosine"):
    return lr_at(step, lr_max=LR_MAX, lr_min=LR_MIN, warmup_steps=warmup, total_steps=T, kind=kind)


def closed_form_cosine(t, warmup):
    return LR_MIN + 0.5 * (LR_MAX - LR_MIN) * (1 + math.cos(math.pi * (t - warmup) / (T - warmup)))


def test_boundaries_against_closed_form():
    assert at(0) == pytest.approx(LR_MAX / W)  # first update: lr_max / warmup_steps, not lr_max
    assert at(W - 1) == pytest.approx(LR_MAX)  # last warmup step reaches lr_max
    assert at(W) == pytest.approx(LR_MAX)  # cosine starts at lr_max
    mid = W + (T - W) // 2
    assert at(mid) == pytest.approx((LR_MAX + LR_MIN) / 2)
    assert at(T - 1) == pytest.approx(closed_form_cosine(T - 1, W))
    assert LR_MIN < at(T - 1) < at(T - 2)
    assert at(T) == pytest.approx(LR_MIN)
    for t in range(W):
        assert at(t) == pytest.approx(LR_MAX * (t + 1) / W)


def test_no_warmup_is_the_seeds_cosine():
    assert at(0, warmup=0) == LR_MAX
    for t in range(T):
        assert at(t, warmup=0) == pytest.approx(closed_form_cosine(t, 0))


def torch_lrs(make, steps=T):
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=LR_MAX)
    sched = make(opt)
    lrs = []
    for _ in range(steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return lrs


@pytest.mark.parametrize("warmup", [0, 1, 2, W, T - 1])
def test_parity_with_torch_warmup_then_cosine(warmup):
    def make(opt):
        cosine = CosineAnnealingLR(opt, T_max=T - warmup, eta_min=LR_MIN)
        if warmup == 0:
            return cosine
        linear = LinearLR(opt, start_factor=1 / warmup, end_factor=1.0, total_iters=max(warmup - 1, 0))
        return SequentialLR(opt, [linear, cosine], milestones=[warmup])

    ours = [at(t, warmup=warmup) for t in range(T)]
    assert ours == pytest.approx(torch_lrs(make), rel=1e-9, abs=1e-15)


def test_parity_with_torch_constant_and_warmup():
    ours = [at(t, kind="constant") for t in range(T)]
    theirs = torch_lrs(lambda opt: SequentialLR(opt, [LinearLR(opt, 1 / W, 1.0, W - 1), ConstantLR(opt, 1.0, 0)], [W]))
    assert ours == pytest.approx(theirs, rel=1e-12)


def test_scheduler_drives_optimizer_with_lr_at_and_round_trips_state():
    opt = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=LR_MAX)
    sched = WarmupCosineLR(opt, lr_min=LR_MIN, warmup_steps=W, total_steps=T)
    seen = []
    for _ in range(20):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert seen == [at(t) for t in range(20)]
    state = sched.state_dict()
    opt2 = torch.optim.Adam([torch.zeros(1, requires_grad=True)], lr=LR_MAX)
    sched2 = WarmupCosineLR(opt2, lr_min=0.5, warmup_steps=1, total_steps=2)
    sched2.load_state_dict(state)
    opt2.param_groups[0]["lr"] = sched2.get_last_lr()[0]
    for t in range(20, T):
        assert opt2.param_groups[0]["lr"] == at(t)
        opt2.step()
        sched2.step()


def test_warmup_steps_round_and_never_drop_an_asked_warmup():
    assert warmup_steps(0, 469) == 0 and warmup_steps(1, 469) == 469 and warmup_steps(0.5, 3) == 2
    assert warmup_steps(0.4, 1) == 1 and warmup_steps(0.5, 1) == 1  # round() alone gives 0 for both
