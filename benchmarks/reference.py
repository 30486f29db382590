"""The seed's own training loop, kept as written (indentation restored): the baseline every speed-up is measured against.

Two seed details are kept on purpose because this is the *timing* baseline: the scheduler steps after
optimizer.step() from lr_max, and grad norms are read after clipping. Its maths differs from ours only there.
"""
from __future__ import annotations

import math
import time

import torch
from torch import nn, optim
from torch.utils.data import DataLoader
from torchvision import datasets, transforms


class SeedNet(nn.Module):
    """The seed's StableNet: conv-norm-ReLU then pool (ReLU before pool), NCHW."""

    def __init__(self, norm_type: str = "none"):
        super().__init__()

        def make_norm(channels):
            if norm_type == "batch":
                return nn.BatchNorm2d(channels)
            if norm_type == "layer":
                return nn.GroupNorm(1, channels)
            return nn.Identity()

        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), make_norm(32), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), make_norm(64), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(64, 128, 3, padding=1), make_norm(128), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        )
        self.classifier = nn.Linear(128, 10)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.xavier_normal_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x):
        x = self.features(x)
        return self.classifier(x.view(x.size(0), -1))


class SeedScheduler:
    """The seed's CosineWarmupScheduler, verbatim."""

    def __init__(self, optimizer, warmup_steps, total_steps, lr_min=1e-6):
        self.optimizer, self.warmup_steps, self.total_steps, self.lr_min = optimizer, warmup_steps, total_steps, lr_min
        self.lr_max = optimizer.param_groups[0]["lr"]
        self.step_count = 0

    def step(self):
        self.step_count += 1
        if self.step_count <= self.warmup_steps:
            lr = self.lr_max * self.step_count / self.warmup_steps
        else:
            progress = (self.step_count - self.warmup_steps) / (self.total_steps - self.warmup_steps)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + math.cos(math.pi * progress))
        for pg in self.optimizer.param_groups:
            pg["lr"] = lr
        return lr


def log_gradient_norms(model):
    """The seed's per-parameter norms, one host sync each."""
    return {name: p.grad.norm().item() for name, p in model.named_parameters() if p.grad is not None}


def seed_loader(data_dir: str, batch_size: int = 128) -> DataLoader:
    """torchvision MNIST with per-sample ToTensor + Normalize in a DataLoader, as the seed builds it."""
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((0.1307,), (0.3081,))])
    return DataLoader(datasets.MNIST(data_dir, train=True, download=False, transform=transform),
                      batch_size=batch_size, shuffle=True)


def train_seed_loop(norm_type="batch", use_warmup=True, use_clipping=True, max_norm=1.0, epochs=5, lr=1e-3,
                    batch_size=128, data_dir="data", device="cpu", on_epoch=None) -> dict:
    """The seed's train_with_cookbook; on_epoch(epoch, seconds, mean loss) is called after each epoch."""
    device = torch.device(device)
    train_loader = seed_loader(data_dir, batch_size)
    model = SeedNet(norm_type=norm_type).to(device)
    optimizer = optim.Adam(model.parameters(), lr=lr)
    criterion = nn.CrossEntropyLoss()
    total_steps = len(train_loader) * epochs
    warmup_steps = len(train_loader) if use_warmup else 0
    scheduler = SeedScheduler(optimizer, warmup_steps, total_steps)
    history = {"loss": [], "grad_norms": [], "lr": []}
    for epoch in range(epochs):
        model.train()
        epoch_loss, started = 0.0, time.perf_counter()
        for batch_idx, (data, target) in enumerate(train_loader):
            data, target = data.to(device), target.to(device)
            optimizer.zero_grad()
            loss = criterion(model(data), target)
            loss.backward()
            if use_clipping:
                torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
            if batch_idx % 50 == 0:
                gnorms = log_gradient_norms(model)
                history["grad_norms"].append(sum(v**2 for v in gnorms.values()) ** 0.5)
            optimizer.step()
            history["lr"].append(scheduler.step())
            epoch_loss += loss.item()
        history["loss"].append(epoch_loss / len(train_loader))
        if on_epoch:
            on_epoch(epoch + 1, time.perf_counter() - started, history["loss"][-1])
    return history
