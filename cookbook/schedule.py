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


class WarmupCosineLR(torch.optim.lr_scheduler.LRScheduler):
    """torch scheduler whose every value is lr_at(step); step it after optimizer.step()."""

    def __init__(self, optimizer, *, lr_min: float, warmup_steps: int, total_steps: int, kind: str = "cosine", last_epoch: int = -1):
        self.lr_min, self.warmup_steps, self.total_steps, self.kind = lr_min, warmup_steps, total_steps, kind
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        return [
            lr_at(self.last_epoch, lr_max=base, lr_min=self.lr_min, warmup_steps=self.warmup_steps,
                  total_steps=self.total_steps, kind=self.kind)
            for base in self.base_lrs
        ]
