"""K seeds of one config trained as one model: grouped convs, per-member norms, classifiers and clipping.

Every member computes exactly what a separate run with its seed computes (same init, same data order,
its own BatchNorm statistics and clip factor); only the kernels are shared. On a GPU, where one small
CNN leaves the card idle, this multiplies runs per hour; on a CPU it does not (see the benchmark).
"""
from __future__ import annotations

import dataclasses
import time

import torch
import torch.nn.functional as F
from torch import nn

from .clipping import clip_factor
from .config import Config
from .data import MNIST, batches
from .hooks import Hook, Hooks
from .model import StableNet, build_model, parameter_count
from .monitor import member_norms
from .train import DivergenceCheck, TrainResult, build_parts, epoch_summary, resolve_device


class StackedLinear(nn.Module):
    """K linear layers applied to K feature groups: [B, K*C] -> [B, K, out]."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))  # [K, out, C]
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]))  # [K, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        return torch.einsum("bkc,koc->bko", x.view(x.shape[0], k, -1), self.weight) + self.bias


def stack_layer(layers: list[nn.Module]) -> nn.Module:
    """One module doing the work of the same layer of K members, their parameters and buffers concatenated."""
    first, k = layers[0], len(layers)
    cat = lambda name: torch.cat([getattr(m, name).detach() for m in layers])  # noqa: E731
    if isinstance(first, nn.Conv2d):
        stacked = nn.Conv2d(first.in_channels * k, first.out_channels * k, first.kernel_size, padding=first.padding, groups=k)
    elif isinstance(first, nn.BatchNorm2d):
        stacked = nn.BatchNorm2d(first.num_features * k, eps=first.eps, momentum=first.momentum)
        stacked.running_mean.copy_(cat("running_mean"))
        stacked.running_var.copy_(cat("running_var"))
    elif isinstance(first, nn.GroupNorm):  # GroupNorm(1, C) per member == GroupNorm(K, K*C)
        stacked = nn.GroupNorm(first.num_groups * k, first.num_channels * k, eps=first.eps)
    else:
        return first  # ReLU, pools, Identity: parameter-free and channel-wise
    with torch.no_grad():
        stacked.weight.copy_(cat("weight"))
        stacked.bias.copy_(cat("bias"))
    return stacked


class StackedStableNet(nn.Module):
    """K StableNets of one architecture as one module; input [B, K, 28, 28] (member k's images in channel k)."""

    def __init__(self, members: list[StableNet]):
        super().__init__()
        self.members = len(members)
        self.features = nn.Sequential(*[stack_layer(list(layers)) for layers in zip(*(m.features for m in members))])
        self.classifier = StackedLinear([m.classifier for m in members])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x).flatten(1))  # [B, K, classes]


def same_but_seed(cfgs: list[Config]) -> None:
    """Members must share everything but the seed (one model, one optimizer, one schedule)."""
    first = dataclasses.replace(cfgs[0], seed=0, name="")
    for cfg in cfgs[1:]:
        if dataclasses.replace(cfg, seed=0, name="") != first:
            raise ValueError(f"stacked members must differ only in seed: {cfgs[0].name} vs {cfg.name}")


def clip_members(params: list[nn.Parameter], members: int, max_norm: float | None) -> torch.Tensor:
    """Per-member total grad norm before clipping ([K]); clip each member as clip_grad_norm_ would clip it alone."""
    norms = member_norms([p.grad for p in params], members).norm(dim=0)
    if max_norm is not None:
        factor = clip_factor(norms, max_norm)
        for p in params:  # dim 0 holds the members' blocks in order, whatever the memory format
            p.grad.mul_(factor.repeat_interleave(p.shape[0] // members).view(-1, *[1] * (p.dim() - 1)))
    return norms


@torch.no_grad()
def evaluate_members(model: StackedStableNet, x: torch.Tensor, y: torch.Tensor, precision, batch_size: int = 1000):
    """Per-member mean cross-entropy and accuracy on the shared test set."""
    model.eval()
    k = model.members
    loss_sum = torch.zeros(k, device=x.device)
    correct = torch.zeros(k, device=x.device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with precision:
            logits = model(xb.expand(-1, k, -1, -1).contiguous()).float()
        loss_sum += F.cross_entropy(logits.transpose(1, 2), yb[:, None].expand(-1, k), reduction="none").sum(0)
        correct += (logits.argmax(2) == yb[:, None]).sum(0)
    return (loss_sum / len(y)).tolist(), (correct / len(y)).tolist()


def train_stacked_epoch(parts, cfg, data, order, first_step, fans, checks, results):
    """One epoch for every member; returns per-member [loss sum, grad-norm sum, clipped steps]; marks divergence."""
    model, optimizer, scheduler, monitor = parts.model, parts.optimizer, parts.scheduler, parts.monitor
    model.train()
    k, max_norm = model.members, cfg.optim.max_norm
    sums = torch.zeros(3, k, device=data.train_x.device)
    for i in range(len(order[0])):
        step = first_step + i
        idx = torch.stack([member[i] for member in order]).T.to(data.train_x.device)  # [B, K]
        x, y = data.train_x[idx].squeeze(2), data.train_y[idx]  # [B, K, 28, 28], [B, K]
        if cfg.compute.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        optimizer.zero_grad(set_to_none=True)
        with parts.precision:
            logits = model(x)
        losses = F.cross_entropy(logits.float().transpose(1, 2), y, reduction="none").mean(0)  # [K]: each member's mean
        losses.sum().backward()  # member k's parameters get exactly d(loss_k)
        monitor.before_clip(step)
        grad_norms = clip_members(monitor.params, k, max_norm)
        lr = optimizer.param_groups[0]["lr"]
        optimizer.step()
        scheduler.step()
        clipped = grad_norms > max_norm if max_norm is not None else torch.zeros_like(grad_norms, dtype=torch.bool)
        sums += torch.stack([losses.detach(), grad_norms, clipped.to(sums.dtype)])
        if monitor.record(step, losses, grad_norms, lr) or i == len(order[0]) - 1:
            for member, rows in enumerate(monitor.flush()):
                result = results[member]
                if result.diverged:
                    continue
                bad = checks[member].first_bad_step(rows)
                fans[member].on_metrics([(s, m) for s, m in rows if bad is None or s < bad])
                if bad is not None:  # the others train on: a member's NaNs never reach another member's weights
                    result.diverged, result.diverged_step, result.steps_run = True, bad, bad
            if all(r.diverged for r in results):
                break
    return sums.T.tolist()


def train_stacked(cfgs: list[Config], data: MNIST, hooks: list[list[Hook]]) -> list[TrainResult]:
    """Train len(cfgs) seeds of one config as one stacked model; member k reports through hooks[k]."""
    same_but_seed(cfgs)
    cfg, k = cfgs[0], len(cfgs)
    device = resolve_device(cfg.device)
    data = data.to(device)
    members = []
    for c in cfgs:
        torch.manual_seed(c.seed)  # as build_parts seeds a separate run
        members.append(build_model(c.model))
    parts = build_parts(cfg, len(data.train_y), device, StackedStableNet(members))
    n_train, steps_per_epoch, total = len(data.train_y), parts.steps_per_epoch, parts.total_steps
    monitor = parts.monitor
    shuffles = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    checks = [DivergenceCheck(cfg.monitor.diverge_factor) for _ in cfgs]
    fans = [Hooks(list(h)) for h in hooks]
    results = [TrainResult(steps_run=0, total_steps=total, param_count=parameter_count(members[0])) for _ in cfgs]
    for fan, result in zip(fans, results):
        fan.on_start({"total_steps": total, "steps_per_epoch": steps_per_epoch, "param_count": result.param_count,
                      "param_names": monitor.names, "device": str(device), "stacked_members": k})
    for epoch in range(1, cfg.epochs + 1):
        alive = [i for i, r in enumerate(results) if not r.diverged]
        if not alive:
            break
        for i in alive:
            fans[i].on_epoch_start(epoch)
        started = time.perf_counter()
        order = [batches(n_train, cfg.data.batch_size, g) for g in shuffles]  # each member's own shuffle
        sums = train_stacked_epoch(parts, cfg, data, order, (epoch - 1) * steps_per_epoch, fans, checks, results)
        seconds = time.perf_counter() - started
        test_loss, test_acc = evaluate_members(parts.model, data.test_x, data.test_y, parts.precision)
        for i in alive:
            if results[i].diverged:
                continue
            results[i].steps_run += steps_per_epoch
            results[i].final = epoch_summary(sums[i], steps_per_epoch, test_loss[i], test_acc[i], seconds, n_train)
            fans[i].on_epoch_end(epoch, results[i].final)
    for i, (fan, result) in enumerate(zip(fans, results)):
        result.snapshots = [r for r in monitor.snapshot_table(i) if r["step"] < result.steps_run]
        fan.on_end(result)
    return results
