"""What a run logs beside its metrics and tags: its datasets and its model."""
from __future__ import annotations

import copy
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import torch
from mlflow.entities import Dataset, DatasetInput, InputTag

from .config import TEST_SIZE, TRAIN_SIZE, Config
from .data import raw_dir
from .delivery import spool_path


def dataset_inputs(cfg: Config, md5: dict[str, str]) -> list[DatasetInput]:
    """The run's train and test sets as MLflow datasets (the run page's Datasets section): named, with the official
    MD5 sums of their two IDX files as source, the rows used of the full split as profile, and a digest of both: MLflow
    keeps one dataset per name and digest in an experiment, so a run with another subset or folder needs its own."""
    inputs = []
    for name, context, size, subset in (("mnist-train", "training", TRAIN_SIZE, cfg.data.train_subset),
                                        ("mnist-test", "evaluation", TEST_SIZE, cfg.data.test_subset)):
        prefix = "train" if name == "mnist-train" else "t10k"
        sums = {f: md5[f] for f in sorted(md5) if f.startswith(prefix)}
        source = json.dumps({"uri": str(raw_dir(cfg.data.data_dir)), "md5": sums})
        profile = json.dumps({"num_rows": min(subset or size, size), "full_split_rows": size, "subset": subset})
        digest = hashlib.md5((source + profile).encode()).hexdigest()[:8]
        inputs.append(DatasetInput(Dataset(name, digest, "local", source, profile=profile),
                                   tags=[InputTag("mlflow.data.context", context)]))
    return inputs


def save_model(model: torch.nn.Module, run_id: str) -> Path:
    """The trained network as an MLflow pytorch model folder in the spool dir (a CPU copy, with signature and an input
    example), ready for the writer to upload; pinned requirements, so no slow requirement inference."""
    import mlflow.pytorch

    path = spool_path(run_id).with_suffix(".model").resolve()  # the spool may be replayed from another folder
    shutil.rmtree(path, ignore_errors=True)
    example = np.zeros((1, 1, 28, 28), dtype=np.float32)  # one normalised MNIST image's shape
    model = copy.deepcopy(model).cpu().eval()
    for name, child in list(model.named_children()):  # cookbook.fused_norm's training-time Sequential: the plain one
        if hasattr(child, "plain"):
            setattr(model, name, child.plain())
    mlflow.pytorch.save_model(model, str(path), input_example=example, serialization_format="pickle",
                              pip_requirements=[f"torch=={torch.__version__.split('+')[0]}"],
                              code_paths=[str(Path(__file__).parent)])  # the pickle names cookbook's classes: load anywhere
    return path



def dataset_ids(inputs: list[DatasetInput]) -> dict[str, list[str]]:
    """{context: [name, digest]} of the run's datasets ('training', 'evaluation'): what a model's metrics link to."""
    return {i.tags[0].value: [i.dataset.name, i.dataset.digest] for i in inputs}
