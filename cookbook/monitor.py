"""Gradient and loss monitoring that syncs with the host only every flush_every steps, for one model or K stacked members."""
from __future__ import annotations

import contextlib

import torch
from torch import nn

from .config import MonitorConfig
from .hooks import Rows

# logged at every step; the last stored step of a run is the last step of STEP_LOSS
STEP_LOSS, STEP_LR, STEP_GRAD_NORM = "train/loss", "opt/lr", "opt/grad_norm_preclip"


@contextlib.contextmanager
def host_sync():
    """Marks a deliberate wait for the device: CUDA's sync debug mode ("error" in the tests) is off inside."""
    mode = torch.cuda.get_sync_debug_mode() if torch.cuda.is_available() else 0
    if mode == 0:  # the usual case: nothing to lift (and torch warns each time the mode is set)
        yield
        return
    torch.cuda.set_sync_debug_mode(0)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(mode)


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

    def wants_norms(self, step: int) -> bool:
        """Whether step's per-layer norms are kept (a layer step or a snapshot step)."""
        return step % self.cfg.layer_every == 0 or step in self.snapshot_steps

    def norms(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-layer gradient and weight norms now ([params, members] each); call before clipping touches the grads."""
        return member_norms([p.grad for p in self.params], self.members), member_norms([p.detach() for p in self.params], self.members)

    def keep(self, step: int, grads: torch.Tensor, weights: torch.Tensor) -> None:
        """Keep step's norms where wanted (copies: a CUDA graph overwrites its outputs on the next replay)."""
        if step % self.cfg.layer_every == 0:
            self.layer_norms.append((step, grads.clone()))
        if step in self.snapshot_steps:
            self.snapshots.append((step, grads.clone(), weights.clone()))

    def record(self, step: int, values: torch.Tensor, lr: float) -> bool:
        """Store this step's [loss, pre-clip grad norm] x members; return True when the buffer is full and should be flushed."""
        self.scalars[len(self.pending)].copy_(values)
        self.pending.append((step, lr))
        return len(self.pending) == self.cfg.flush_every

    def flush(self) -> list[Rows]:
        """One host transfer for everything buffered; returns each member's (step, metrics) rows in step order."""
        n, k_all = len(self.pending), self.members
        buffered = torch.cat([self.scalars[:n].flatten(), *(norms.to(self.scalars.dtype).flatten() for _, norms in self.layer_norms)])
        with host_sync():
            flat = buffered.tolist()  # n x [loss, gnorm] x members, then each layer step's params x members
        at = lambda i, k: flat[i * k_all + k]  # noqa: E731  (the i-th [members] row, member k)
        out = []
        for k in range(k_all):
            rows: dict[int, dict[str, float]] = {}
            for r, (step, lr) in enumerate(self.pending):
                rows[step] = {STEP_LOSS: at(2 * r, k), STEP_LR: lr, STEP_GRAD_NORM: at(2 * r + 1, k)}
            for j, (step, _) in enumerate(self.layer_norms):
                first = 2 * n + j * len(self.names)
                rows.setdefault(step, {}).update({f"grads/{name}": at(first + p, k) for p, name in enumerate(self.names)})
            out.append(sorted(rows.items()))
        self.pending, self.layer_norms = [], []
        return out

    def snapshot_table(self, member: int = 0) -> list[dict]:
        """Tidy rows (step, param, numel, grad_norm, weight_norm) of one member for the snapshot steps reached."""
        table = []
        for step, grads, weights in self.snapshots:
            with host_sync():
                grads, weights = grads.tolist(), weights.tolist()
            for name, p, g, w in zip(self.names, self.params, grads, weights):
                table.append({"step": step, "param": name, "numel": p.numel() // self.members,
                              "grad_norm": g[member], "weight_norm": w[member]})
        return table
