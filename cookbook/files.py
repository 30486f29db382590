"""The files a run keeps while it runs (checkpoints, spools, model copies): written whole, their folder gone once empty."""
from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path

ATTEMPTS = 3  # another run may remove the (empty) folder between our mkdir and our write: make it again


def write_whole(path: Path, write: Callable[[Path], None]) -> None:
    """write(partial file), then rename it onto path: a kill mid-write leaves the previous file, never half of one."""
    partial = path.with_name(path.name + ".partial")  # its own: a checkpoint and a spool may share a folder and a stem
    for attempt in range(ATTEMPTS):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            write(partial)
            os.replace(partial, path)
            return
        except FileNotFoundError:
            if attempt == ATTEMPTS - 1 or path.parent.is_dir():
                raise


def remove_if_empty(folder: Path) -> None:
    """Remove a run's folder (./checkpoints, ./mlflow-spool) if nothing is left in it; another run's files keep it."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def blocking_file(path: Path) -> Path | None:
    """The nearest existing path at or above `path`, if it is a file: then no folder can be made there."""
    found = next((p for p in (path, *path.parents) if p.exists()), None)
    return found if found is not None and not found.is_dir() else None
