"""The training loop on a small MNIST slice: monitoring, divergence, determinism, parity with a plain loop."""
import dataclasses
import math

import pytest
import torch

from cookbook.config import merge, validate
from cookbook.hooks import Recorder
from cookbook.model import build_model
from cookbook.stacked import train_stacked
from cookbook.train import build_optimizer, make_current, train


def run(cfg, data):
    rec = Recorder()
    return train(cfg, data, [rec]), rec.history


def test_every_step_and_layer_metric_is_reported(tiny_cfg, tiny_data):
    result, hist = run(tiny_cfg, tiny_data)
    steps = 2 * 256 // 32
    assert result.steps_run == result.total_steps == steps and not result.diverged
    for key in ["train/loss", "opt/lr", "opt/grad_norm_preclip"]:
        assert [s for s, _ in hist[key]] == list(range(steps))
    assert [s for s, _ in hist["grads/classifier.weight"]] == list(range(0, steps, 4))
    assert [s for s, _ in hist["test/acc"]] == [1, 2]
    assert {r["step"] for r in result.snapshots} == {0, 5, 9}
    names = {r["param"] for r in result.snapshots}
    assert names == {n for n, _ in build_model(tiny_cfg.model).named_parameters()}


def test_preclip_norm_is_logged_and_clip_fraction_counted(tiny_cfg, tiny_data):
    cfg = merge(tiny_cfg, {"optim": {"max_norm": 1e-3}})
    result, hist = run(cfg, tiny_data)
    assert min(v for _, v in hist["opt/grad_norm_preclip"]) > 1e-3  # the seed logged post-clip norms (<= max_norm)
    assert [v for _, v in hist["epoch/clip_fraction"]] == [1.0, 1.0]
    off, _ = run(tiny_cfg, tiny_data)
    assert off.final["epoch/clip_fraction"] == 0.0


def test_warmup_first_update_uses_small_lr(tiny_cfg, tiny_data):
    _, hist = run(tiny_cfg, tiny_data)
    warmup_steps = 4  # 0.5 epoch x 8 steps
    assert hist["opt/lr"][0][1] == pytest.approx(1e-3 / warmup_steps)
    assert hist["opt/lr"][warmup_steps - 1][1] == pytest.approx(1e-3)


def test_same_seed_is_bitwise_identical_and_other_seed_is_not(tiny_cfg, tiny_data):
    _, a = run(tiny_cfg, tiny_data)
    _, b = run(tiny_cfg, tiny_data)
    _, c = run(dataclasses.replace(tiny_cfg, seed=1), tiny_data)
    timeless = lambda h: {k: v for k, v in h.items() if not k.startswith("time/")}  # noqa: E731
    assert timeless(a) == timeless(b)
    assert a["train/loss"] != c["train/loss"]


def test_divergence_stops_early_with_finite_metrics(tiny_cfg, tiny_data):
    cfg = validate(merge(tiny_cfg, {"optim": {"name": "sgd", "lr": 50.0}, "schedule": {"warmup_epochs": 0}}))
    result, hist = run(cfg, tiny_data)
    assert result.diverged and 0 < result.diverged_step < result.total_steps
    assert result.steps_run == result.diverged_step
    assert [s for s, _ in hist["train/loss"]] == list(range(result.diverged_step))
    assert all(math.isfinite(v) for series in hist.values() for _, v in series)


@pytest.mark.parametrize("epochs", [1, 2])
@pytest.mark.parametrize("stacked", [False, True])
def test_an_epochs_last_update_is_judged_too(tiny_cfg, tiny_data, epochs, stacked):
    """One update per epoch: the update that blows up is the epoch's last, seen by no training loss of its epoch."""
    cfg = validate(merge(tiny_cfg, {"epochs": epochs, "optim": {"name": "sgd", "lr": 1e36}, "schedule": {"warmup_epochs": 0},
                                    "data": {"batch_size": len(tiny_data.train_y)}}))
    if stacked:
        recorders = [Recorder(), Recorder()]
        (result, _) = train_stacked([cfg, dataclasses.replace(cfg, seed=1)], tiny_data, [[r] for r in recorders])
        hist = recorders[0].history
    else:
        result, hist = run(cfg, tiny_data)
    assert result.diverged and result.diverged_step == result.steps_run == 1 and result.model is None
    assert [s for s, _ in hist["train/loss"]] == [0] and "test/loss" not in hist  # the epoch's summary is not logged
    assert all(math.isfinite(v) for series in hist.values() for _, v in series)


@pytest.mark.parametrize("name,cls", [("adam", torch.optim.Adam), ("adamw", torch.optim.AdamW), ("sgd", torch.optim.SGD)])
def test_optimizer_choices_train(name, cls, tiny_cfg, tiny_data):
    cfg = validate(merge(tiny_cfg, {"optim": {"name": name, "lr": 0.05 if name == "sgd" else 1e-3, "weight_decay": 0.01}}))
    optimizer = build_optimizer(cfg.optim, build_model(cfg.model))
    group = optimizer.param_groups[0]
    assert type(optimizer) is cls and group["weight_decay"] == 0.01
    assert name != "sgd" or group["momentum"] == 0.9
    result, hist = run(cfg, tiny_data)
    losses = [v for _, v in hist["train/loss"]]
    assert not result.diverged and sum(losses[-4:]) < sum(losses[:4])


def test_only_a_gpu_named_by_index_becomes_the_current_device(monkeypatch):
    """cuda:1's graph capture must happen on GPU 1; 'cuda' has no index to set (torch refuses it) and needs none."""
    from torch.cuda._utils import _get_device_index
    made_current = []
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: made_current.append(_get_device_index(device)))
    for name in ("cpu", "cuda", "cuda:1", "cuda:0"):
        make_current(torch.device(name))
    assert made_current == [1, 0]
