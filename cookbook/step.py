"""One training update as a function of the batch indices: run eagerly, or captured once and replayed as a CUDA graph.

An update maps batch indices (already on the device) to [3, members] statistics (loss, pre-clip grad norm,
clipped or not) and, when asked, the per-layer gradient and weight norms before clipping. It reads and
writes only tensors that live across steps (data, weights, grads, optimizer state, a tensor lr), so the
same kernels can be recorded once and replayed: a small CNN's step is a few hundred launches that
take longer to issue than to run.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from .monitor import host_sync

Update = Callable[[torch.Tensor, bool], tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor] | None]]
EAGER_STEPS = 3  # real steps run before capture: they create the optimizer state and cuBLAS/cuDNN workspaces


def step_stats(losses: torch.Tensor, grad_norms: torch.Tensor, max_norm: float | None) -> torch.Tensor:
    """[3, members]: loss, pre-clip grad norm, and 1.0 where clipping scaled the gradients."""
    losses = losses.detach().reshape(-1)
    grad_norms = grad_norms.detach().reshape(-1).to(losses.dtype)
    clipped = grad_norms > max_norm if max_norm is not None else torch.zeros_like(grad_norms, dtype=torch.bool)
    return torch.stack([losses, grad_norms, clipped.to(losses.dtype)])


class StepRunner:
    """Calls update(idx, norms); with graphs on, the full-size batches after EAGER_STEPS replay one captured CUDA graph.

    Batches of another size (the epoch's short last one) run eagerly, through the same optimizer and weights.
    A replay returns the graph's output tensors, which the next replay overwrites: copy what must be kept.
    """

    def __init__(self, update: Update, graphs: bool):
        self.update, self.graphs = update, graphs
        self.graph: torch.cuda.CUDAGraph | None = None
        self.static_idx: torch.Tensor | None = None
        self.outputs = None
        self.eager_steps = 0
        self.stream = torch.cuda.Stream() if graphs else None

    def __call__(self, idx: torch.Tensor, norms: bool):
        if not self.graphs or (self.static_idx is not None and idx.shape != self.static_idx.shape):
            return self.update(idx, norms)
        if self.graph is None and self.eager_steps < EAGER_STEPS:
            self.eager_steps += 1
            return self._on_side_stream(idx, norms)
        if self.graph is None:
            self._capture(idx)
        self.static_idx.copy_(idx)
        self.graph.replay()
        return self.outputs

    def _on_side_stream(self, idx: torch.Tensor, norms: bool):
        """An eager step on the stream the capture will use (torch's recipe: warm up off the default stream)."""
        self.stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(self.stream):
            out = self.update(idx, norms)
        torch.cuda.current_stream().wait_stream(self.stream)
        if self.static_idx is None:
            self.static_idx = idx.clone()
        return out

    def _capture(self, idx: torch.Tensor) -> None:
        """Record one update (norms included: they are cheap and the graph cannot choose per step); nothing runs yet."""
        self.static_idx = idx.clone()
        self.graph = torch.cuda.CUDAGraph()
        with host_sync(), torch.cuda.graph(self.graph, stream=self.stream):  # capture synchronises the device once
            self.outputs = self.update(self.static_idx, True)
