"""Progress display: a tqdm bar per epoch on a terminal, plain lines otherwise."""
from __future__ import annotations

import sys

from tqdm import tqdm

from .hooks import Hook
from .monitor import STEP_LOSS, STEP_LR


class Progress(Hook):
    """Shows steps, running loss and LR; one summary line per epoch."""

    def __init__(self, label: str, stream=sys.stderr, lines_per_epoch: int = 4):
        self.label, self.stream, self.lines_per_epoch = label, stream, lines_per_epoch
        self.tty = stream.isatty()
        self.bar = None
        self.done = 0

    def on_start(self, info):
        self.steps_per_epoch, self.epochs = info["steps_per_epoch"], info["total_steps"] // info["steps_per_epoch"]
        print(f"[{self.label}] {info['param_count']:,} parameters on {info['device']}, "
              f"{self.epochs} epochs x {self.steps_per_epoch} steps", file=self.stream)

    def on_epoch_start(self, epoch):
        self.epoch, self.done = epoch, 0
        if self.tty:
            self.bar = tqdm(total=self.steps_per_epoch, desc=f"[{self.label}] epoch {epoch}/{self.epochs}",
                            file=self.stream, leave=False, dynamic_ncols=True)

    def on_metrics(self, rows):
        steps = [m for _, m in rows if STEP_LOSS in m]
        if not steps:
            return
        loss, lr = sum(m[STEP_LOSS] for m in steps) / len(steps), steps[-1][STEP_LR]
        before, self.done = self.done, self.done + len(steps)
        if self.bar is not None:
            self.bar.update(len(steps))
            self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}")
        elif before * self.lines_per_epoch // self.steps_per_epoch != self.done * self.lines_per_epoch // self.steps_per_epoch:
            print(f"[{self.label}] epoch {self.epoch}/{self.epochs} step {self.done}/{self.steps_per_epoch} "
                  f"loss {loss:.4f} lr {lr:.2e}", file=self.stream, flush=True)

    def on_epoch_end(self, epoch, metrics):
        if self.bar is not None:
            self.bar.close()
        print(f"[{self.label}] epoch {epoch}/{self.epochs}: train loss {metrics['epoch/train_loss']:.4f}  "
              f"test loss {metrics['test/loss']:.4f}  test acc {metrics['test/acc']:.4f}  "
              f"grad norm {metrics['epoch/grad_norm_preclip_mean']:.3f}  clipped {metrics['epoch/clip_fraction']:.1%}  "
              f"{metrics['time/epoch_seconds']:.1f}s", file=self.stream, flush=True)

    def on_end(self, result):
        if self.bar is not None:
            self.bar.close()
        if result.diverged:
            print(f"[{self.label}] DIVERGED at step {result.diverged_step}", file=self.stream, flush=True)
