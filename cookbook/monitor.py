"""Gradient and loss monitoring that syncs with the host only every flush_every steps."""
from __future__ import annotations

import torch
from torch import nn

from .config import MonitorConfig
from .hooks import Rows


def per_tensor_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, as one stacked tensor (one fused kernel, no host sync)."""
    return torch.stack(torch._foreach_norm(tensors))


class Monitor:
    """Buffers per-step loss / grad norm / lr on device and per-layer norms on their steps."""

    def __init__(self, model: nn.Module, cfg: MonitorConfig, device: torch.device):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.cfg = cfg
        self.snapshot_steps = set(cfg.snapshot_steps)
        self.scalars = torch.zeros(cfg.flush_every, 2, device=device)  # columns: loss, grad_norm_preclip
        self.pending: list[tuple[int, float]] = []  # (step, lr) for rows in self.scalars
        self.layer_norms: list[tuple[int, torch.Tensor]] = []
        self.snapshots: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def before_clip(self, step: int) -> None:
        """Capture per-layer grad norms (and weight norms on snapshot steps) before clipping touches them."""
        take_layers = step % self.cfg.layer_every == 0
        if not (take_layers or step in self.snapshot_steps):
            return
        grads = per_tensor_norms([p.grad for p in self.params])
        if take_layers:
            self.layer_norms.append((step, grads))
        if step in self.snapshot_steps:
            self.snapshots.append((step, grads, per_tensor_norms([p.detach() for p in self.params])))

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> bool:
        """Store this step's scalars; return True when the buffer is full and should be flushed."""
        row = len(self.pending)
        self.scalars[row, 0] = loss.detach()
        self.scalars[row, 1] = grad_norm.detach()
        self.pending.append((step, lr))
        return len(self.pending) == self.cfg.flush_every

    def flush(self) -> Rows:
        """One host transfer for everything buffered; returns (step, metrics) rows in step order."""
        values = self.scalars[: len(self.pending)].tolist()
        rows: dict[int, dict[str, float]] = {}
        for (step, lr), (loss, gnorm) in zip(self.pending, values):
            rows[step] = {"train/loss": loss, "opt/lr": lr, "opt/grad_norm_preclip": gnorm}
        for step, norms in self.layer_norms:
            rows.setdefault(step, {}).update({f"grads/{n}": v for n, v in zip(self.names, norms.tolist())})
        self.pending, self.layer_norms = [], []
        return sorted(rows.items())

    def snapshot_table(self) -> list[dict]:
        """Tidy rows (step, param, numel, grad_norm, weight_norm) for the snapshot steps reached."""
        table = []
        for step, grads, weights in self.snapshots:
            for name, p, g, w in zip(self.names, self.params, grads.tolist(), weights.tolist()):
                table.append({"step": step, "param": name, "numel": p.numel(), "grad_norm": g, "weight_norm": w})
        return table
