"""Learning-rate schedule: linear warmup then cosine decay (or constant), as a pure function and a torch scheduler."""
from __future__ import annotations

import math

import torch


def lr_at(step: int, *, lr_max: float, lr_min: float, warmup_steps: int, total_steps: int, kind: str = "cosine") -> float:
    """Learning rate used by update number `step` (0-based).

    Warmup: lr_max * (step + 1) / warmup_steps, so update 0 uses lr_max / warmup_steps and
    update warmup_steps - 1 uses lr_max. Then cosine from lr_max (at step = warmup_steps)
    towards lr_min at step = total_steps, or constant lr_max.
    """
    if step < warmup_steps:
        return lr_max * (step + 1) / warmup_steps
    if kind == "constant":
        return lr_max
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return lr_min + 0.5 * (lr_max - lr_min) * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def warmup_steps(warmup_epochs: float, steps_per_epoch: int) -> int:
    """Updates in a warmup of `warmup_epochs` epochs: the nearest whole number, and at least 1 when any warmup is asked
    (0.4 epochs of a 1-step epoch would otherwise round to none)."""
    steps = round(warmup_epochs * steps_per_epoch)
    return max(steps, 1) if warmup_epochs > 0 else 0


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """torch scheduler whose every value is lr_at(step); step it after optimizer.step().

    lr_max: the peak per param group as Python floats (default: the groups' lr), so that a tensor lr
    (which a CUDA graph reads on the device) is only ever filled, never read back to the host.
    """

    def __init__(self, optimizer, *, lr_max: list[float] | None = None, lr_min: float, warmup_steps: int, total_steps: int,
                 kind: str = "cosine", last_epoch: int = -1):
        self.lr_max = lr_max or [float(group["lr"]) for group in optimizer.param_groups]
        self.lr_min, self.warmup_steps, self.total_steps, self.kind = lr_min, warmup_steps, total_steps, kind
        super().__init__(optimizer, last_epoch)

    def lr_of(self, step: int, group: int = 0) -> float:
        """The learning rate update number `step` uses in param group `group`."""
        return lr_at(step, lr_max=self.lr_max[group], lr_min=self.lr_min, warmup_steps=self.warmup_steps,
                     total_steps=self.total_steps, kind=self.kind)

    def get_lr(self) -> list[float]:
        return [self.lr_of(self.last_epoch, g) for g in range(len(self.lr_max))]

    def step(self, epoch: None = None) -> None:
        """Advance to the next update's lr (torch's step, without relying on how a torch version writes a tensor lr)."""
        self.last_epoch += 1
        self._last_lr = self.get_lr()
        set_lr(self.optimizer, self._last_lr)


def set_lr(optimizer: torch.optim.Optimizer, lrs: list[float]) -> None:
    """Each param group's lr; a tensor lr (CUDA) is filled in place, as the CUDA graph that reads it holds that tensor."""
    for group, lr in zip(optimizer.param_groups, lrs):
        if torch.is_tensor(group["lr"]):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr
