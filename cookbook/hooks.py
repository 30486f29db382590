"""The monitoring hook API: the training loop calls these; tracking and progress implement them."""
from __future__ import annotations

from typing import Any

Rows = list[tuple[int, dict[str, float]]]  # (step, {metric name: value})


class Hook:
    """Base hook: every callback is optional."""

    def on_start(self, info: dict[str, Any]) -> None:
        """Before the first step; info has total_steps, steps_per_epoch, param_count, param_names, device and optionally
        tags (run tags the loop sets, e.g. determinism settings)."""

    def on_epoch_start(self, epoch: int) -> None:
        """Before the first step of epoch (1-based)."""

    def on_metrics(self, rows: Rows) -> None:
        """A batch of per-step metrics, flushed from the device every monitor.flush_every steps."""

    def on_epoch_end(self, epoch: int, metrics: dict[str, float]) -> None:
        """Epoch summary (train mean loss, test loss/acc, seconds, ...)."""

    def on_end(self, result: Any) -> None:
        """After training (finished or diverged) with the TrainResult."""


class Hooks(Hook):
    """Fan one call out to several hooks, in order."""

    def __init__(self, hooks: list[Hook]):
        self.hooks = list(hooks)

    def on_start(self, info):
        for h in self.hooks:
            h.on_start(info)

    def on_epoch_start(self, epoch):
        for h in self.hooks:
            h.on_epoch_start(epoch)

    def on_metrics(self, rows):
        for h in self.hooks:
            h.on_metrics(rows)

    def on_epoch_end(self, epoch, metrics):
        for h in self.hooks:
            h.on_epoch_end(epoch, metrics)

    def on_end(self, result):
        for h in self.hooks:
            h.on_end(result)


class Recorder(Hook):
    """Keeps every metric in memory as {name: [(step, value), ...]}."""

    def __init__(self):
        self.history: dict[str, list[tuple[int, float]]] = {}

    def on_metrics(self, rows):
        for step, metrics in rows:
            for name, value in metrics.items():
                self.history.setdefault(name, []).append((step, value))

    def on_epoch_end(self, epoch, metrics):
        self.on_metrics([(epoch, metrics)])
