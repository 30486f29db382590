"""Per-epoch checkpoints: everything the next epoch depends on, written atomically, so a killed run resumes exactly."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from .files import remove_if_empty, write_whole

CHECKPOINT_DIR = os.environ.get("COOKBOOK_CHECKPOINT_DIR", "checkpoints")  # relative to where the command runs


def checkpoint_path(run_id: str, checkpoint_dir: str | Path = CHECKPOINT_DIR) -> Path:
    """Where the run's latest checkpoint lives (one file per run, replaced every epoch)."""
    return Path(checkpoint_dir) / f"{run_id}.pt"


def save(path: Path, state: dict) -> None:
    """Write state to path atomically: a kill mid-write leaves the previous epoch's checkpoint, never half of one."""
    def write(partial: Path) -> None:
        with open(partial, "wb") as file:  # open() says FileNotFoundError if our folder went; torch.save, a RuntimeError
            torch.save(state, file)

    write_whole(path, write)


def load(path: Path | None) -> dict | None:
    """The checkpoint at path, on the CPU (the caller moves it where it trains), or None if there is none."""
    if path is None or not path.is_file():
        return None
    return torch.load(path, map_location="cpu", weights_only=False)  # our own file: tensors, floats and RNG states


def remove(path: Path | None) -> None:
    """Delete a finished run's checkpoint (the run is complete, nothing will resume it), and its folder if now empty."""
    if path is not None:
        path.unlink(missing_ok=True)
        remove_if_empty(path.parent)
