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
from .data import MNIST, batches, on_device
from .determinism import configure
from .hooks import Hook, Hooks
from .model import StableNet, build_model, parameter_count
from .monitor import host_sync, member_norms
from .stacked_conv import StackedConv2d
from .step import StepRunner, step_stats
from .stop import uninterrupted
from .train import (
    EVAL_BATCH,
    DivergenceCheck,
    Parts,
    TrainResult,
    build_parts,
    epoch_summary,
    mark_diverged,
    resolve_device,
    run_epoch,
    uses_graphs,
)

STACKED_CONV_TAG = "stacked_conv"  # on a run trained as one member of a stacked model: its convs' kind


class StackedLinear(nn.Module):
    """K linear layers applied to K feature groups: [B, K*C] -> [B, K, out]."""

    def __init__(self, layers: list[nn.Linear]):
        super().__init__()
        self.weight = nn.Parameter(torch.stack([m.weight.detach() for m in layers]))  # [K, out, C]
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in layers]))  # [K, out]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.weight.shape[0]
        return torch.einsum("bkc,koc->bko", x.view(x.shape[0], k, -1), self.weight) + self.bias


def conv_kind(setting: str, device: torch.device) -> str:
    """compute.stacked_conv resolved: 'auto' is fused on CUDA (the fastest kind in every block on an H100), grouped elsewhere."""
    if setting != "auto":
        return setting
    return "fused" if device.type == "cuda" else "grouped"


def block_convs(conv: str, blocks: int) -> list[str]:
    """A resolved compute.stacked_conv as one BLOCK_CONVS kind per conv block: 'hybrid' is gemm for the first block
    (one input channel a member, where cuDNN's grouped kernel is slowest) and grouped for the rest."""
    if conv == "hybrid":
        return ["gemm"] + ["grouped"] * (blocks - 1)
    return conv.split("+") if "+" in conv else [conv] * blocks


def stack_layer(layers: list[nn.Module], conv: str = "grouped") -> nn.Module:
    """One module doing the work of the same layer of K members, their parameters and buffers concatenated.
    conv, for a Conv2d: 'grouped' (a grouped Conv2d), 'gemm' (cookbook.stacked_conv) or 'fused' (cookbook.fused_conv's
    Triton kernels)."""
    first, k = layers[0], len(layers)
    cat = lambda name: torch.cat([getattr(m, name).detach() for m in layers])  # noqa: E731
    if isinstance(first, nn.Conv2d) and conv == "fused":
        from .fused_conv import FusedStackedConvFunction  # Triton: imported only when asked for
        return StackedConv2d(layers, FusedStackedConvFunction)
    if isinstance(first, nn.Conv2d) and conv == "gemm":
        return StackedConv2d(layers)
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

    def __init__(self, members: list[StableNet], conv: str = "grouped"):
        super().__init__()
        self.members = len(members)
        layers = list(zip(*(m.features for m in members)))
        kinds = iter(block_convs(conv, sum(isinstance(layer[0], nn.Conv2d) for layer in layers)))
        self.features = nn.Sequential(*[stack_layer(list(layer), next(kinds)) if isinstance(layer[0], nn.Conv2d)
                                        else stack_layer(list(layer)) for layer in layers])
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


def member_losses(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """[B, K] cross-entropy of each member's logits [B, K, C] against its labels [B, K].
    As one [B*K, C] batch: the per-class layout ([B, C, K]) runs CUDA's nll_loss2d, which has no deterministic kernel.
    At least fp32, as autocast gives a separate run's loss; float64 stays float64 (the parity tests)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), reduction="none").view(labels.shape)


@torch.no_grad()
def evaluate_members(model: StackedStableNet, x: torch.Tensor, y: torch.Tensor, precision, batch_size: int = EVAL_BATCH):
    """Per-member mean cross-entropy and accuracy on the shared test set."""
    model.eval()
    k = model.members
    loss_sum = torch.zeros(k, device=x.device)
    correct = torch.zeros(k, device=x.device)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with precision:
            logits = model(xb.expand(-1, k, -1, -1).contiguous()).float()
        loss_sum += member_losses(logits, yb[:, None].expand(-1, k)).sum(0)
        correct += (logits.argmax(2) == yb[:, None]).sum(0)
    with host_sync():
        loss, acc = (torch.stack([loss_sum, correct]) / len(y)).tolist()
    return loss, acc


def stacked_update(parts: Parts, data: MNIST, cfg: Config):
    """The update of every member on its own batch data[idx[:, k]] (idx: [B, K]; see cookbook.step)."""
    model, k, max_norm = parts.model, parts.monitor.members, cfg.optim.max_norm

    def update(idx: torch.Tensor, norms: bool):
        x, y = data.train_x[idx].squeeze(2), data.train_y[idx]  # [B, K, 28, 28], [B, K]
        if cfg.compute.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        parts.optimizer.zero_grad(set_to_none=True)
        with parts.precision:
            logits = model(x)
        losses = member_losses(logits, y).mean(0)  # [K]: each member's mean
        losses.sum().backward()  # member k's parameters get exactly d(loss_k)
        layers = parts.monitor.norms() if norms else None
        grad_norms = clip_members(parts.monitor.params, k, max_norm)
        parts.optimizer.step()
        return step_stats(losses, grad_norms, max_norm), layers
    return update


def deliver_each(fans: list[Hook], checks: list[DivergenceCheck], results: list[TrainResult]):
    """Flushed rows -> each live member's hooks, up to its first diverged step; stop when every member diverged."""
    def deliver(flushed) -> bool:
        for fan, check, result, rows in zip(fans, checks, results, flushed):
            if result.diverged:
                continue
            bad = check.first_bad_step(rows)
            fan.on_metrics([(s, m) for s, m in rows if bad is None or s < bad])
            if bad is not None:  # the others train on: a member's NaNs never reach another member's weights
                mark_diverged(result, bad)
        return all(r.diverged for r in results)
    return deliver


def seeded_members(cfgs: list[Config]) -> list[nn.Module]:
    """Each member's network, initialised under its own seed as build_parts seeds a separate run."""
    members = []
    for c in cfgs:
        torch.manual_seed(c.seed)
        members.append(build_model(c.model))
    return members


def end_epoch(epoch: int, members: list[tuple], seconds: float, n_train: int, steps_per_epoch: int) -> None:
    """Each live member's epoch summary to its hooks, or its divergence found at the epoch's end; a signal meanwhile
    waits until every member's hooks have the summary of the epoch that counts as run."""
    with uninterrupted():
        for result, check, fan, sums, test_loss, test_acc in members:
            if result.diverged:
                continue
            if check.broke_at_epoch_end(test_loss):
                mark_diverged(result, result.steps_run + steps_per_epoch)
                continue
            result.steps_run += steps_per_epoch
            result.final = epoch_summary(sums, steps_per_epoch, test_loss, test_acc, seconds, n_train)
            fan.on_epoch_end(epoch, result.final)


def train_stacked(cfgs: list[Config], data: MNIST, hooks: list[list[Hook]]) -> list[TrainResult]:
    """Train len(cfgs) seeds of one config as one stacked model; member k reports through hooks[k]."""
    same_but_seed(cfgs)
    cfg, k = cfgs[0], len(cfgs)
    device = resolve_device(cfg.device)
    tags = configure(cfg.compute.deterministic, device)
    data = data.to(device)
    members = seeded_members(cfgs)
    conv = conv_kind(cfg.compute.stacked_conv, device)
    parts = build_parts(cfg, len(data.train_y), device, StackedStableNet(members, conv))
    runner = StepRunner(stacked_update(parts, data, cfg), graphs=uses_graphs(cfg, device))
    n_train, steps_per_epoch, total = len(data.train_y), parts.steps_per_epoch, parts.total_steps
    shuffles = [torch.Generator().manual_seed(c.seed) for c in cfgs]
    fans = [Hooks(list(h)) for h in hooks]
    results = [TrainResult(steps_run=0, total_steps=total, param_count=parameter_count(members[0])) for _ in cfgs]
    checks = [DivergenceCheck(cfg.monitor.diverge_factor) for _ in cfgs]
    deliver = deliver_each(fans, checks, results)
    for fan, result in zip(fans, results):
        fan.on_start({"total_steps": total, "steps_per_epoch": steps_per_epoch, "param_count": result.param_count,
                      "param_names": parts.monitor.names, "device": str(device), "stacked_members": k,
                      "tags": {**tags, "cuda_graphs": str(runner.graphs).lower(), STACKED_CONV_TAG: conv}})
    for epoch in range(1, cfg.epochs + 1):
        if not (alive := [i for i, r in enumerate(results) if not r.diverged]):
            break
        for i in alive:
            fans[i].on_epoch_start(epoch)
        started = time.perf_counter()
        order = [batches(n_train, cfg.data.batch_size, g) for g in shuffles]  # each member's own shuffle
        order = on_device([torch.stack(b, 1) for b in zip(*order)], device)  # [B, K] per step
        sums = run_epoch(parts, runner, order, (epoch - 1) * steps_per_epoch, deliver)
        if sums is None:
            break
        with host_sync():
            sums = sums.T.tolist()
        seconds = time.perf_counter() - started
        test_loss, test_acc = evaluate_members(parts.model, data.test_x, data.test_y, parts.precision)
        end_epoch(epoch, [(results[i], checks[i], fans[i], sums[i], test_loss[i], test_acc[i]) for i in alive], seconds,
                  n_train, steps_per_epoch)
    for i, (fan, result) in enumerate(zip(fans, results)):
        result.snapshots = [r for r in parts.monitor.snapshot_table(i) if r["step"] < result.steps_run]
        fan.on_end(result)
    return results
