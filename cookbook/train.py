"""The training loop: seeded, monitored, and stopping early (not crashing) on divergence."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .checkpoint import load, save
from .clipping import clip_gradients, is_diverged
from .config import Config, OptimConfig
from .data import MNIST, batches, on_device
from .determinism import configure
from .hooks import Hook, Hooks, Rows
from .model import build_model, parameter_count
from .monitor import STEP_LOSS, Monitor, host_sync
from .schedule import WarmupCosineLR, set_lr, warmup_steps
from .step import StepRunner, step_stats
from .stop import uninterrupted

# logged at every epoch's end
EPOCH_LOSS, EPOCH_GRAD_NORM, CLIP_FRACTION = "epoch/train_loss", "epoch/grad_norm_preclip_mean", "epoch/clip_fraction"
TEST_LOSS, TEST_ACC = "test/loss", "test/acc"
EPOCH_SECONDS, SAMPLES_PER_SECOND = "time/epoch_seconds", "time/samples_per_second"
SUMMARY_KEYS = (EPOCH_LOSS, EPOCH_GRAD_NORM, CLIP_FRACTION, TEST_LOSS, TEST_ACC, EPOCH_SECONDS, SAMPLES_PER_SECOND)  # epoch_summary's
RESUMED_TAG = "resumed_from_step"  # on a run continued from a checkpoint: the steps it had done before


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
    model: nn.Module | None = field(default=None, repr=False)  # the trained network (a finished single run only)


def resolve_device(name: str) -> torch.device:
    """'auto' -> cuda if available, else cpu."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def make_current(device: torch.device) -> None:
    """A GPU named by index (cuda:1) becomes the current one: side streams, CUDA-graph capture and Triton kernels run on
    the current device, not on their tensors' ('cuda' alone already means the current one)."""
    if device.type == "cuda" and device.index is not None:
        torch.cuda.set_device(device)


def build_optimizer(cfg: OptimConfig, model: nn.Module) -> torch.optim.Optimizer:
    """Adam (the seed's), AdamW or SGD with momentum; fused (one kernel for all parameters) on CPU and CUDA.

    On CUDA the lr is a device tensor and Adam's step count stays on the device (capturable): a CUDA graph
    replays the step with the schedule's current lr, and no step reads a value back to the host.
    """
    params = list(model.parameters())
    device = params[0].device
    fused = device.type in ("cpu", "cuda")
    lr = torch.full((), cfg.lr, device=device) if device.type == "cuda" else cfg.lr
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, fused=fused)
    adam = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
    return adam(params, lr=lr, weight_decay=cfg.weight_decay, fused=fused, capturable=device.type == "cuda")


def autocast(cfg: Config, device: torch.device):
    """bf16 autocast when cfg.compute.precision asks for it, else a no-op context.
    No cast cache: a CUDA graph cannot capture one, and each weight is cast once per forward anyway."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.compute.precision == "bf16", cache_enabled=False)


EVAL_BATCH = 1000  # images a test-pass batch holds: no gradients there, so larger than training's


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = EVAL_BATCH, precision=None) -> tuple[float, float]:
    """Mean cross-entropy and accuracy on (x, y), with one host sync (precision: an autocast context)."""
    model.eval()
    loss_sum = torch.zeros((), device=x.device)
    correct = torch.zeros((), device=x.device, dtype=torch.long)
    for xb, yb in zip(x.split(batch_size), y.split(batch_size)):
        with precision or contextlib.nullcontext():
            logits = model(xb)
        loss_sum += F.cross_entropy(logits.float(), yb, reduction="sum")
        correct += (logits.argmax(1) == yb).sum()
    with host_sync():
        loss, acc = torch.stack([loss_sum, correct.to(loss_sum.dtype)]).div(len(y)).tolist()
    return loss, acc


class DivergenceCheck:
    """Applies the divergence rule to flushed rows, against the loss of step 0."""

    def __init__(self, factor: float):
        self.factor, self.initial_loss = factor, None

    def first_bad_step(self, rows) -> int | None:
        for step, metrics in rows:
            if STEP_LOSS not in metrics:
                continue
            if self.initial_loss is None:
                self.initial_loss = metrics[STEP_LOSS]
            if is_diverged(metrics[STEP_LOSS], self.initial_loss, self.factor):
                return step
        return None

    def broke_at_epoch_end(self, test_loss: float) -> bool:
        """No training loss sees an epoch's last update: the test loss of the network it made is judged instead."""
        return self.initial_loss is not None and is_diverged(test_loss, self.initial_loss, self.factor)


def mark_diverged(result: TrainResult, step: int) -> None:
    """The run diverged at `step`: the first step whose loss breaks the rule; the steps before it are its history."""
    result.diverged, result.diverged_step, result.steps_run = True, step, step


@dataclass
class Parts:
    """Everything one training run updates, built from its config."""

    model: nn.Module
    precision: contextlib.AbstractContextManager  # autocast for forward passes
    optimizer: torch.optim.Optimizer
    scheduler: WarmupCosineLR
    monitor: Monitor
    steps_per_epoch: int
    total_steps: int


def build_parts(cfg: Config, n_train: int, device: torch.device, model: nn.Module | None = None) -> Parts:
    """Model (cfg's, seeded with cfg.seed, unless one is given), optimizer, LR scheduler and monitor for n_train images."""
    make_current(device)
    if model is None:
        torch.manual_seed(cfg.seed)
        model = build_model(cfg.model)
    if cfg.compute.fused_norm:  # the same modules and state; training runs their norm, pool and ReLU as Triton kernels
        from .fused_norm import FusedNormSequential
        model.features = FusedNormSequential(model.features)
    model = model.to(device)
    if cfg.compute.channels_last:
        model = model.to(memory_format=torch.channels_last)
    optimizer = build_optimizer(cfg.optim, model)
    steps_per_epoch = -(-n_train // cfg.data.batch_size)
    total_steps = steps_per_epoch * cfg.epochs
    scheduler = WarmupCosineLR(optimizer, lr_max=[cfg.optim.lr], lr_min=cfg.schedule.lr_min, kind=cfg.schedule.kind,
                               total_steps=total_steps,
                               warmup_steps=warmup_steps(cfg.schedule.warmup_epochs, steps_per_epoch))
    monitor = Monitor(model, cfg.monitor, device, members=getattr(model, "members", 1))
    return Parts(model, autocast(cfg, device), optimizer, scheduler, monitor, steps_per_epoch, total_steps)


def single_update(parts: Parts, data: MNIST, max_norm: float | None):
    """The update of one model on the batch data[idx] (see cookbook.step)."""
    def update(idx: torch.Tensor, norms: bool):
        parts.optimizer.zero_grad(set_to_none=True)
        with parts.precision:
            loss = F.cross_entropy(parts.model(data.train_x[idx]), data.train_y[idx])
        loss.backward()
        layers = parts.monitor.norms() if norms else None
        grad_norm = clip_gradients(parts.monitor.params, max_norm)
        parts.optimizer.step()
        return step_stats(loss, grad_norm, max_norm), layers
    return update


def run_epoch(parts: Parts, runner: StepRunner, order: list[torch.Tensor], first_step: int,
              deliver: Callable[[list[Rows]], bool]) -> torch.Tensor | None:
    """Train over the batches in order (indices on the device); hand each flush's rows (one list per member) to
    deliver, which returns True to stop. Returns the [3, members] sums of step_stats, or None if stopped."""
    parts.model.train()
    monitor = parts.monitor
    sums = torch.zeros(3, monitor.members, device=order[0].device)
    try:
        for i, idx in enumerate(order):
            step = first_step + i
            norms = monitor.wants_norms(step)
            stats, layers = runner(idx, norms)
            if norms:
                monitor.keep(step, *layers)
            lr = parts.scheduler.lr_of(step)
            parts.scheduler.step()
            sums += stats
            if monitor.record(step, stats[:2], lr) or i == len(order) - 1:
                with uninterrupted():  # a signal while the rows are handed over would lose them: it waits till after
                    stop = deliver(monitor.flush())
                if stop:
                    return None
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: hand over every step that finished, then stop
        deliver([[(s, m) for s, m in rows if STEP_LOSS in m] for rows in monitor.flush()])
        raise
    return sums


def deliver_to(hook: Hook, check: DivergenceCheck, result: TrainResult) -> Callable[[list[Rows]], bool]:
    """Flushed rows -> hook, up to the first diverged step (which ends the run: result is marked)."""
    def deliver(flushed: list[Rows]) -> bool:
        rows = flushed[0]
        bad = check.first_bad_step(rows)
        hook.on_metrics([(s, m) for s, m in rows if bad is None or s < bad])
        if bad is not None:
            mark_diverged(result, bad)
        return bad is not None
    return deliver


def uses_graphs(cfg: Config, device: torch.device) -> bool:
    """CUDA graphs are used on CUDA unless the config turns them off."""
    return cfg.compute.cuda_graphs and device.type == "cuda"


def epoch_summary(sums: list[float], steps: int, test_loss: float, test_acc: float, seconds: float, n_train: int) -> dict:
    """The per-epoch metrics from [loss sum, pre-clip grad-norm sum, clipped steps] over the epoch's steps."""
    loss_sum, gnorm_sum, clipped_steps = sums  # the train loss: the mean of batch losses, as the seed reports
    values = (loss_sum / steps, gnorm_sum / steps, clipped_steps / steps, test_loss, test_acc, seconds, n_train / seconds)
    return dict(zip(SUMMARY_KEYS, values, strict=True))


def checkpoint_state(parts: Parts, epoch: int, result: TrainResult, shuffle: torch.Generator, check: DivergenceCheck) -> dict:
    """Everything the epochs after `epoch` depend on (a CUDA graph is captured afresh: it holds no state of its own)."""
    return {"epoch": epoch, "steps_run": result.steps_run, "final": result.final, "model": parts.model.state_dict(),
            "optimizer": parts.optimizer.state_dict(), "scheduler": parts.scheduler.state_dict(),
            "snapshots": parts.monitor.snapshots, "shuffle": shuffle.get_state(), "initial_loss": check.initial_loss}


def restore(state: dict, parts: Parts, result: TrainResult, shuffle: torch.Generator, check: DivergenceCheck) -> int:
    """Put a checkpoint_state back in place; return the epoch it was taken after."""
    parts.model.load_state_dict(state["model"])
    lrs = [group["lr"] for group in parts.optimizer.param_groups]  # on CUDA: the device tensors a graph will read
    parts.optimizer.load_state_dict(state["optimizer"])
    for group, lr in zip(parts.optimizer.param_groups, lrs):
        group["lr"] = lr
    parts.scheduler.load_state_dict(state["scheduler"])
    set_lr(parts.optimizer, parts.scheduler.get_last_lr())
    device = parts.monitor.scalars.device
    parts.monitor.snapshots = [(step, g.to(device), w.to(device)) for step, g, w in state["snapshots"]]
    shuffle.set_state(state["shuffle"])
    check.initial_loss = state["initial_loss"]
    result.steps_run, result.final = state["steps_run"], state["final"]
    return state["epoch"]


def train(cfg: Config, data: MNIST, hooks: list[Hook] = (), checkpoint: Path | None = None) -> TrainResult:
    """Train StableNet under cfg on data; report through hooks; return the result.
    checkpoint: a file saved after every epoch and resumed from if it exists (its caller removes it once the run's
    record is complete: the tracker's model upload and end come after this returns)."""
    hook = Hooks(list(hooks))
    device = resolve_device(cfg.device)
    tags = configure(cfg.compute.deterministic, device)
    data = data.to(device)
    n_train = len(data.train_y)
    parts = build_parts(cfg, n_train, device)
    shuffle = torch.Generator().manual_seed(cfg.seed)
    result = TrainResult(steps_run=0, total_steps=parts.total_steps, param_count=parameter_count(parts.model))
    check = DivergenceCheck(cfg.monitor.diverge_factor)
    state = load(checkpoint)
    done = restore(state, parts, result, shuffle, check) if state else 0
    runner = StepRunner(single_update(parts, data, cfg.optim.max_norm), graphs=uses_graphs(cfg, device))
    deliver = deliver_to(hook, check, result)
    hook.on_start({"total_steps": parts.total_steps, "steps_per_epoch": parts.steps_per_epoch,
                   "param_count": result.param_count, "param_names": parts.monitor.names, "device": str(device),
                   "tags": {**tags, "cuda_graphs": str(runner.graphs).lower(),
                            **({RESUMED_TAG: str(result.steps_run)} if state else {})}})
    for epoch in range(done + 1, cfg.epochs + 1):
        hook.on_epoch_start(epoch)
        started = time.perf_counter()
        order = on_device(batches(n_train, cfg.data.batch_size, shuffle), device)
        sums = run_epoch(parts, runner, order, result.steps_run, deliver)
        if sums is None:
            break
        with host_sync():
            sums = sums[:, 0].tolist()
        seconds = time.perf_counter() - started
        test_loss, test_acc = evaluate(parts.model, data.test_x, data.test_y, precision=parts.precision)
        if check.broke_at_epoch_end(test_loss):
            mark_diverged(result, result.steps_run + parts.steps_per_epoch)
            break
        with uninterrupted():  # a signal once the epoch counts as run waits until every hook has its summary and it is saved
            result.steps_run += parts.steps_per_epoch
            result.final = epoch_summary(sums, parts.steps_per_epoch, test_loss, test_acc, seconds, n_train)
            hook.on_epoch_end(epoch, result.final)
            if checkpoint is not None:
                save(checkpoint, checkpoint_state(parts, epoch, result, shuffle, check))
    result.snapshots = [r for r in parts.monitor.snapshot_table() if r["step"] < result.steps_run]
    result.model = None if result.diverged else parts.model
    hook.on_end(result)
    return result
