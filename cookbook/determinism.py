"""torch's process-wide determinism switches for CUDA, set from a run's config and reported as tags."""
from __future__ import annotations

import os

import torch

CUBLAS_WORKSPACE = ":4096:8"  # the setting NVIDIA documents for reproducible cuBLAS results (one fixed workspace)


def configure(deterministic: bool, device: torch.device) -> dict[str, str]:
    """Deterministic kernels (cuDNN, cuBLAS, torch's own) on CUDA when asked; return what is in force as tags.

    On the CPU our ops are deterministic already (at a fixed thread count), so nothing is switched on there.
    """
    on = deterministic and device.type == "cuda"
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", CUBLAS_WORKSPACE)  # read when cuBLAS makes its workspace
    torch.use_deterministic_algorithms(on)
    # NaN-filling every torch.empty finds reads of unwritten memory; ours write all they read, so it only costs kernels.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = device.type == "cuda" and not on  # autotuning picks kernels by timing: not repeatable
    return {"compute.deterministic": str(on).lower(), "cudnn.deterministic": str(on).lower(),
            "cudnn.benchmark": str(torch.backends.cudnn.benchmark).lower(),
            "cublas_workspace_config": os.environ.get("CUBLAS_WORKSPACE_CONFIG", "")}
