"""Our fast loop (channels_last, pool before ReLU, fused Adam, no per-step sync) against the seed's plain loop.

In float64 the two agree to ~1e-13 over every step, which shows the maths is the same; in float32 they
agree to float tolerance at step 0 and drift slowly apart, as any change of summation order does.
"""
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from benchmarks.reference import SeedNet
from cookbook.config import merge, validate
from cookbook.hooks import Recorder
from cookbook.model import build_model
from cookbook.train import train

NORMS = {"none": "none", "batch": "batch", "layer": "layer"}


def plain_loop(cfg, data):
    """The seed's model and loop (NCHW, ReLU then pool, foreach Adam, .item() per step) with torch's schedulers."""
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    model = SeedNet(cfg.model.norm).to(data.train_x.dtype)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.optim.lr)
    n = len(data.train_y)
    per_epoch = -(-n // cfg.data.batch_size)
    total, warm = per_epoch * cfg.epochs, round(cfg.schedule.warmup_epochs * per_epoch)
    sched = torch.optim.lr_scheduler.SequentialLR(opt, [
        torch.optim.lr_scheduler.LinearLR(opt, 1 / warm, 1.0, warm - 1),
        torch.optim.lr_scheduler.CosineAnnealingLR(opt, total - warm, cfg.schedule.lr_min)], [warm])
    losses = []
    for _ in range(cfg.epochs):
        model.train()
        for idx in torch.randperm(n, generator=shuffle).split(cfg.data.batch_size):
            opt.zero_grad()
            loss = F.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.max_norm)
            opt.step()
            sched.step()
            losses.append(loss.item())
    return losses


def ours(cfg, data):
    rec = Recorder()
    train(cfg, data, [rec])
    return [v for _, v in rec.history["train/loss"]]


@pytest.fixture
def float64():
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(torch.float32)


def test_seed_model_has_our_parameters_and_init(tiny_cfg):
    for norm in NORMS:
        cfg = merge(tiny_cfg, {"model": {"norm": norm}})
        torch.manual_seed(0)
        a = build_model(cfg.model).state_dict()
        torch.manual_seed(0)
        b = SeedNet(norm).state_dict()
        assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("norm", NORMS)
def test_loss_curve_equals_plain_loop_in_float64(norm, tiny_cfg, tiny_data, float64):
    cfg = validate(merge(tiny_cfg, {"model": {"norm": norm}, "optim": {"max_norm": 1.0}}))
    data = dataclasses.replace(tiny_data, train_x=tiny_data.train_x.double(), test_x=tiny_data.test_x.double())
    assert ours(cfg, data) == pytest.approx(plain_loop(cfg, data), rel=1e-9)


def test_loss_curve_equals_plain_loop_in_float32(tiny_cfg, tiny_data):
    cfg = validate(merge(tiny_cfg, {"model": {"norm": "batch"}, "optim": {"max_norm": 1.0}}))
    fast, plain = ours(cfg, tiny_data), plain_loop(cfg, tiny_data)
    assert fast[0] == pytest.approx(plain[0], rel=1e-6)  # same init, same batch, same forward
    assert fast == pytest.approx(plain, rel=3e-3)  # 16 Adam steps amplify reordered float sums to ~5e-4


def test_bf16_autocast_is_close_but_not_equal(tiny_cfg, tiny_data):
    cfg = validate(merge(tiny_cfg, {"model": {"norm": "batch"}}))
    fp32, bf16 = ours(cfg, tiny_data), ours(merge(cfg, {"compute": {"precision": "bf16"}}), tiny_data)
    assert bf16 != fp32 and bf16 == pytest.approx(fp32, rel=0.05)
