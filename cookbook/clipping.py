"""Gradient clipping and the divergence rule, as pure functions (the loop uses torch's clip_grad_norm_)."""
from __future__ import annotations

import math

import torch

EPS = 1e-6  # the epsilon torch.nn.utils.clip_grad_norm_ adds to the norm


def clip_factor(total_norm, max_norm: float | None):
    """Scale applied to every gradient: min(1, max_norm / (||g|| + eps)); 1 when clipping is off.
    total_norm: a float, or a tensor of norms (one per stacked member) for a tensor of factors."""
    if max_norm is None:
        return 1.0
    factor = max_norm / (total_norm + EPS)
    return factor.clamp(max=1.0) if isinstance(factor, torch.Tensor) else min(1.0, factor)


def clip_gradients(params, max_norm: float | None) -> torch.Tensor:
    """Clip in place (if max_norm) and return the total norm BEFORE clipping, as a 0-d tensor (no host sync)."""
    grads = [p.grad for p in params if p.grad is not None]
    if max_norm is None:
        return torch.nn.utils.get_total_norm(grads)
    return torch.nn.utils.clip_grad_norm_(params, max_norm)


def is_diverged(loss: float, initial_loss: float, factor: float) -> bool:
    """Diverged when the loss is non-finite or exceeds factor x the loss of the first step."""
    return not math.isfinite(loss) or loss > factor * initial_loss
