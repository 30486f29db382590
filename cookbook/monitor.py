"""Gradient and loss monitoring that syncs with the host only every flush_every steps, for one model or K stacked members."""
from __future__ import annotations

import torch
from torch import nn

from .config import MonitorConfig
from .hooks import Rows


def member_norms(tensors: list[torch.Tensor], members: int = 1) -> torch.Tensor:
    """[len(tensors), members] L2 norms of each tensor's member slices (dim 0 split K ways); no host sync."""
    if members == 1:
        return torch.stack(torch._foreach_norm(tensors)).unsqueeze(1)  # one fused kernel
    return torch.stack([t.reshape(members, -1).norm(dim=1) for t in tensors])


class Monitor:
    """Buffers per-step loss / grad norm / lr on device and per-layer norms on their steps, per member."""

    def __init__(self, model: nn.Module, cfg: MonitorConfig, device: torch.device, members: int = 1):
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.cfg, self.members = cfg, members
        self.snapshot_steps = set(cfg.snapshot_steps)
        self.scalars = torch.zeros(cfg.flush_every, 2, members, device=device)  # loss, grad_norm_preclip
        self.pending: list[tuple[int, float]] = []  # (step, lr) for rows in self.scalars
        self.layer_norms: list[tuple[int, torch.Tensor]] = []
        self.snapshots: list[tuple[int, torch.Tensor, torch.Tensor]] = []

    def before_clip(self, step: int) -> None:
        """Capture per-layer grad norms (and weight norms on snapshot steps) before clipping touches them."""
        take_layers = step % self.cfg.layer_every == 0
        if not (take_layers or step in self.snapshot_steps):
            return
        grads = member_norms([p.grad for p in self.params], self.members)
        if take_layers:
            self.layer_norms.append((step, grads))
        if step in self.snapshot_steps:
            self.snapshots.append((step, grads, member_norms([p.detach() for p in self.params], self.members)))

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, lr: float) -> bool:
        """Store this step's scalars (one per member); return True when the buffer is full and should be flushed."""
        row = len(self.pending)
        self.scalars[row, 0] = loss.detach()
        self.scalars[row, 1] = grad_norm.detach()
        self.pending.append((step, lr))
        return len(self.pending) == self.cfg.flush_every

    def flush(self) -> list[Rows]:
        """One host transfer for everything buffered; returns each member's (step, metrics) rows in step order."""
        values = self.scalars[: len(self.pending)].tolist()  # [row][loss/gnorm][member]
        out = []
        for k in range(self.members):
            rows: dict[int, dict[str, float]] = {}
            for (step, lr), (loss, gnorm) in zip(self.pending, values):
                rows[step] = {"train/loss": loss[k], "opt/lr": lr, "opt/grad_norm_preclip": gnorm[k]}
            for step, norms in self.layer_norms:
                rows.setdefault(step, {}).update({f"grads/{n}": v[k] for n, v in zip(self.names, norms.tolist())})
            out.append(sorted(rows.items()))
        self.pending, self.layer_norms = [], []
        return out

    def snapshot_table(self, member: int = 0) -> list[dict]:
        """Tidy rows (step, param, numel, grad_norm, weight_norm) of one member for the snapshot steps reached."""
        table = []
        for step, grads, weights in self.snapshots:
            for name, p, g, w in zip(self.names, self.params, grads.tolist(), weights.tolist()):
                table.append({"step": step, "param": name, "numel": p.numel() // self.members,
                              "grad_norm": g[member], "weight_norm": w[member]})
        return table
