"""Will a config run here at all (the device exists, the model fits in memory), and which GPUs are there."""
from __future__ import annotations

import os

import psutil
import torch

from .config import STACKED_CONVS, Config, ConfigError, ModelConfig
from .model import block_channels
from .train import EVAL_BATCH

IMAGE_SIDE, CLASSES = 28, 10
OPTIMIZER_COPIES = 4  # weights, gradients and Adam's two moments, each one float per parameter
ACTIVATION_COPIES = 4  # per block output kept for backward: conv, norm, pool and ReLU outputs (an upper bound)
EVAL_COPIES = 3  # a test pass keeps nothing for backward: a block's conv and norm outputs alive together, and a margin


def parameter_estimate(cfg: ModelConfig) -> int:
    """Parameters of build_model(cfg) in closed form, without building it (a width of 1000 would not fit)."""
    total, channels_in = 0, 1
    for out in block_channels(cfg.width, cfg.depth):
        total += channels_in * out * 9 + out + (2 * out if cfg.norm != "none" else 0)
        channels_in = out
    return total + channels_in * CLASSES + CLASSES


def memory_estimate(cfg: Config) -> int:
    """Bytes one training needs at most: float32 parameters, gradients and Adam state, plus the larger of a training
    batch's activations and a test-pass batch's (EVAL_BATCH images, forward only: the larger one for a small batch)."""
    side, blocks = IMAGE_SIDE, []
    for out in block_channels(cfg.model.width, cfg.model.depth):
        blocks.append(out * side * side)
        side //= 2
    activations = max(ACTIVATION_COPIES * cfg.data.batch_size * sum(blocks), EVAL_COPIES * EVAL_BATCH * max(blocks))
    return 4 * (OPTIMIZER_COPIES * parameter_estimate(cfg.model) + activations)


def available_bytes(device: torch.device) -> int:
    """Free memory on the device (RAM for the CPU)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def check(cfg: Config) -> torch.device:
    """The device cfg asks for, if it exists here and the training fits in its free memory; else a one-line ConfigError."""
    name = cfg.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    kind, colon, index = name.partition(":")
    if colon and not index.isdigit():
        raise ConfigError(f"device={cfg.device!r}: the index after ':' must be a number, e.g. cuda:0")
    if kind == "cuda" and (not torch.cuda.is_available() or (index and int(index) >= torch.cuda.device_count())):
        raise ConfigError(f"device={cfg.device!r} is not available here ({torch.cuda.device_count()} CUDA devices); "
                          f"choose cpu{' or cuda:0' if torch.cuda.is_available() else ''}")
    if kind == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"device={cfg.device!r} is not available here; choose cpu")
    device = torch.device(name)
    fused_needs_cuda(cfg, device)
    need, free = memory_estimate(cfg), available_bytes(device)
    if need > free:
        raise ConfigError(f"model.width={cfg.model.width:g} model.depth={cfg.model.depth} needs about {need / 1e9:.1f} GB "
                          f"({parameter_estimate(cfg.model):,} parameters, batch {cfg.data.batch_size}) but {name} has "
                          f"{free / 1e9:.1f} GB free")
    return device


def fused_needs_cuda(cfg: Config, device: torch.device) -> None:
    """compute.stacked_conv with 'fused', or compute.fused_norm, runs Triton kernels: a ConfigError off CUDA (unless
    Triton's CPU interpreter is on)."""
    if device.type == "cuda" or os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return
    if "fused" in cfg.compute.stacked_conv.split("+"):
        raise ConfigError(f"compute.stacked_conv={cfg.compute.stacked_conv!r} runs Triton kernels on a CUDA GPU, not on "
                          f"{device}; choose one of: {', '.join(c for c in STACKED_CONVS if c != 'fused')}")
    if cfg.compute.fused_norm:
        raise ConfigError(f"compute.fused_norm=true runs Triton kernels on a CUDA GPU, not on {device}; set it false")


def visible_gpus() -> list[str]:
    """The CUDA_VISIBLE_DEVICES id of each GPU this process sees, in CUDA's order: its own list if set, else 0..n-1."""
    count = torch.cuda.device_count()
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is None:
        return [str(i) for i in range(count)]
    return [entry.strip() for entry in listed.split(",")][:count]  # CUDA ignores entries past the GPUs it found


def gpu_label(device: str) -> str | None:
    """The physical GPU behind a torch device, e.g. 'NVIDIA H100 80GB HBM3 (CUDA_VISIBLE_DEVICES=3)'; None off CUDA."""
    dev = torch.device(device)
    if dev.type != "cuda":
        return None
    index = torch.cuda.current_device() if dev.index is None else dev.index
    return f"{torch.cuda.get_device_name(index)} (CUDA_VISIBLE_DEVICES={visible_gpus()[index]})"
