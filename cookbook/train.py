"""The training loop: seeded, monitored, and stopping early (not crashing) on divergence."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .clipping import clip_gradients, is_diverged
from .config import Config, OptimConfig
from .data import MNIST, batches
from .hooks import Hook, Hooks
from .model import build_model, parameter_count
from .monitor import Monitor
from .schedule import WarmupCosineLR


@dataclass
class TrainResult:
    """What a training run produced, finished or diverged."""

    steps_run: int
    total_steps: int
    diverged: bool = False
    diverged_step: int | None = None
    final: dict[str, float] = field(default_factory=dict)  # last epoch's summary metrics
    snapshots: list[dict] = field(default_factory=list)  # tidy per-parameter grad/weight norms
    param_count: int = 0


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (the seed's), AdamW or SGD with momentum."""
    params = model.parameters()
    if cfg.name == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 1000) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on (x, y), with one host sync."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        logits = model(xb)
        loss_sum += F.cross_entropy(logits, yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    loss, acc = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).div(len(y)).tolist()
    return loss, acc


def _first_divergence(rows, initial_loss: float, factor: float) -> int | None:
    for step, metrics in rows:
        if "train/loss" in metrics and is_diverged(metrics["train/loss"], initial_loss, factor):
            return step
    return None


def train(cfg: Config, data: MNIST, hooks: list[Hook] = ()) -> TrainResult:
    """Train StableNet under cfg on data; report through hooks; return the result."""
    hook = Hooks(list(hooks))
    device = resolve_device(cfg.device)
    data = data.to(device)
    torch.manual_seed(cfg.seed)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    model = build_model(cfg.model).to(device)
    optimizer = build_optimizer(cfg.optim, model)
    n_train = len(data.train_y)
    steps_per_epoch = -(-n_train // cfg.data.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = WarmupCosineLR(optimizer, lr_min=cfg.schedule.lr_min, kind=cfg.schedule.kind, total_steps=total_steps,
                               warmup_steps=round(cfg.schedule.warmup_epochs * steps_per_epoch))
    monitor = Monitor(model, cfg.monitor, device)
    params = monitor.params
    result = TrainResult(steps_run=0, total_steps=total_steps, param_count=parameter_count(model))
    hook.on_start({"total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
                   "param_count": result.param_count, "param_names": monitor.names, "device": str(device)})
    initial_loss = None
    step = 0
    for epoch in range(1, cfg.epochs + 1):
        hook.on_epoch_start(epoch)
        model.train()
        started = time.perf_counter()
        sums = torch.zeros(3, device=device)  # loss, grad norm, clipped-step count
        for idx in batches(n_train, cfg.data.batch_size, shuffle):
            idx = idx.to(device)
            x, y = data.train_x[idx], data.train_y[idx]
            optimizer.zero_grad(set_to_none=True)
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            monitor.before_clip(step)
            grad_norm = clip_gradients(params, cfg.optim.max_norm)
            lr = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            clipped = (grad_norm > cfg.optim.max_norm) if cfg.optim.max_norm is not None else torch.zeros((), device=device)
            sums += torch.stack([loss.detach(), grad_norm.detach(), clipped.to(sums.dtype)])
            step += 1
            full = monitor.record(step - 1, loss, grad_norm, lr)
            if full or step == epoch * steps_per_epoch:
                rows = monitor.flush()
                initial_loss = rows[0][1]["train/loss"] if initial_loss is None else initial_loss
                bad = _first_divergence(rows, initial_loss, cfg.monitor.diverge_factor)
                if bad is not None:
                    hook.on_metrics([(s, m) for s, m in rows if s < bad])
                    result.diverged, result.diverged_step, result.steps_run = True, bad, bad
                    result.snapshots = [r for r in monitor.snapshot_table() if r["step"] < bad]
                    hook.on_end(result)
                    return result
                hook.on_metrics(rows)
        seconds = time.perf_counter() - started
        loss_sum, gnorm_sum, clipped_count = sums.tolist()
        test_loss, test_acc = evaluate(model, data.test_x, data.test_y)
        result.final = {
            "epoch/train_loss": loss_sum / steps_per_epoch,
            "epoch/grad_norm_preclip_mean": gnorm_sum / steps_per_epoch,
            "epoch/clip_fraction": clipped_count / steps_per_epoch,
            "test/loss": test_loss,
            "test/acc": test_acc,
            "time/epoch_seconds": seconds,
            "time/samples_per_second": n_train / seconds,
        }
        hook.on_epoch_end(epoch, result.final)
    result.steps_run = step
    result.snapshots = monitor.snapshot_table()
    hook.on_end(result)
    return result
