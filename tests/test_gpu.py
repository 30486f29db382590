"""CUDA only (skipped without a GPU): bit-identical seeds, CUDA graphs equal to the eager step, no host sync per step."""
import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from mlflow import MlflowClient

from conftest import CONFIGS_DIR, DATA_DIR, TINY_FLAGS, WITH_ROOT
from cookbook.config import load_config
from cookbook.data import load_mnist
from cookbook.hooks import Hook, Recorder
from cookbook.stacked import stack_layer, train_stacked
from cookbook.train import train

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
SMALL = {"epochs": 2, "device": "cuda", "data": {"data_dir": str(DATA_DIR), "train_subset": 2000, "test_subset": 1000},
         "monitor": {"layer_every": 5, "flush_every": 7, "snapshot_steps": [0, 9]}}  # 16 steps an epoch, the last one short


@pytest.fixture(scope="module")
def data():
    return load_mnist(DATA_DIR, 2000, 1000)


def cfg_of(name: str, optimizer: str = "adam", **compute):
    return load_config(name, CONFIGS_DIR, {**SMALL, "optim": {"name": optimizer}, "compute": compute})


def history(cfg, data) -> dict:
    rec = Recorder()
    train(cfg, data, [rec])
    return {k: v for k, v in rec.history.items() if not k.startswith("time/")}


def first_difference(a: dict, b: dict) -> str | None:
    """None when equal, else the first metric and step where they differ (with both values)."""
    for key in sorted(set(a) | set(b)):
        for (s1, v1), (s2, v2) in zip(a.get(key, []), b.get(key, [])):
            if (s1, v1) != (s2, v2):
                return f"{key} step {s1}: {v1!r} vs {v2!r} (rel {abs(v1 - v2) / (abs(v2) or 1):.2e})"
        if len(a.get(key, [])) != len(b.get(key, [])):
            return f"{key}: {len(a.get(key, []))} vs {len(b.get(key, []))} values"
    return None


@pytest.mark.parametrize("name", ["no_tricks", "batchnorm", "layernorm", "all_tricks"])
def test_same_config_and_seed_give_bit_identical_histories(name, data):
    cfg = cfg_of(name)
    assert first_difference(history(cfg, data), history(cfg, data)) is None


@pytest.mark.parametrize("name,precision,optimizer", [
    ("no_tricks", "fp32", "adam"), ("batchnorm", "fp32", "adam"), ("layernorm", "fp32", "adam"), ("all_tricks", "fp32", "adam"),
    ("all_tricks", "bf16", "adam"), ("all_tricks", "fp32", "adamw"), ("all_tricks", "fp32", "sgd")])
def test_cuda_graph_replay_gives_the_eager_steps_history(name, precision, optimizer, data):
    graphed = history(cfg_of(name, optimizer, precision=precision), data)
    eager = history(cfg_of(name, optimizer, precision=precision, cuda_graphs=False), data)
    assert first_difference(graphed, eager) is None


def stacked_histories(cfg, data, k=3, hooks=()) -> list[dict]:
    """Each member's history; hooks go to the first member's."""
    recs = [Recorder() for _ in range(k)]
    train_stacked([dataclasses.replace(cfg, seed=s) for s in range(k)], data, [[r, *(hooks if i == 0 else ())] for i, r in enumerate(recs)])
    return [{m: v for m, v in r.history.items() if not m.startswith("time/")} for r in recs]


def test_stacked_graph_equals_eager_and_each_member_its_separate_run(data):
    cfg = cfg_of("all_tricks", stacked_conv="grouped")  # cuDNN as the separate run; gemm's FP32 against TF32: test below
    graphed, eager = stacked_histories(cfg, data), stacked_histories(dataclasses.replace(
        cfg, compute=dataclasses.replace(cfg.compute, cuda_graphs=False)), data)
    assert [first_difference(g, e) for g, e in zip(graphed, eager)] == [None] * 3
    for seed, member in enumerate(graphed):
        alone = history(dataclasses.replace(cfg, seed=seed), data)
        assert [v for _, v in member["train/loss"]] == pytest.approx([v for _, v in alone["train/loss"]], rel=3e-3)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA GPUs")
def test_a_run_on_the_second_gpu_is_captured_there(data):
    """Captured on GPU 0, the graph of a cuda:1 run would be empty and its replays would train nothing."""
    cfg = dataclasses.replace(cfg_of("batchnorm"), device="cuda:1")
    eager = dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, cuda_graphs=False))
    assert first_difference(history(cfg, data), history(eager, data)) is None


class NoSyncInsideEpochs(Hook):
    """CUDA's sync debug mode set to "error" from each epoch's start to its end: any unmarked host wait raises."""

    def on_epoch_start(self, epoch):
        torch.cuda.set_sync_debug_mode("error")

    def on_epoch_end(self, epoch, metrics):
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("graphs", [True, False])
def test_training_steps_never_wait_for_the_device(graphs, data):
    cfg = cfg_of("all_tricks", cuda_graphs=graphs)
    try:
        train(cfg, data, [NoSyncInsideEpochs()])
        train_stacked([dataclasses.replace(cfg, seed=s) for s in range(2)], data, [[NoSyncInsideEpochs()], []])
    finally:
        torch.cuda.set_sync_debug_mode(0)


def test_reproduce_says_exact_on_the_gpu(tmp_path):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri, **WITH_ROOT}  # in tmp_path: artifacts and checkpoints there
    cli = lambda *a: subprocess.run([sys.executable, "-m", "cookbook", *a], cwd=tmp_path, env=env,  # noqa: E731
                                    capture_output=True, text=True, timeout=600)
    trained = cli("train", "--config", "all_tricks", *TINY_FLAGS, "--device", "cuda", "--no-log-model")
    assert trained.returncode == 0, trained.stderr[-2000:]
    client = MlflowClient(uri)
    (run,) = [r for e in client.search_experiments() for r in client.search_runs(e.experiment_id)]
    assert run.data.tags["compute.deterministic"] == "true" and run.data.tags["cuda_graphs"] == "true"
    again = cli("reproduce", run.info.run_id)
    assert again.returncode == 0 and "metrics reproduced exactly" in again.stdout, again.stdout[-3000:]


@pytest.mark.parametrize("kind", ["gemm", "fused"])
@pytest.mark.parametrize("channels,out,side", [(1, 32, 28), (32, 64, 14)])  # the first layer, and a wide one
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_matmul_stacked_convs_match_grouped_conv_on_the_gpu(precision, channels, out, side, kind):
    torch.manual_seed(0)
    convs = [torch.nn.Conv2d(channels, out, 3, padding=1) for _ in range(4)]
    x = torch.randn(8, 4 * channels, side, side, device="cuda").contiguous(memory_format=torch.channels_last)
    outs = []
    for conv in ("grouped", kind, kind):  # the second call of kind: bit-identical to the first
        layer = stack_layer(convs, conv).cuda().to(memory_format=torch.channels_last)
        leaf = x.clone().requires_grad_()
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=precision == "bf16"):
            y = layer(leaf)
        y.float().square().sum().backward()
        weight_grad = layer.weight.grad.view(4, out, channels, 3, 3) if conv == "grouped" else \
            layer.weight.grad.view(4, 3, 3, channels, out).permute(0, 4, 3, 1, 2)
        outs.append((y.float(), leaf.grad, weight_grad, layer.bias.grad.view(4, out)))
    tol = 2e-2 if precision == "bf16" else 5e-3  # relative to each tensor's norm: cuDNN's fp32 convs use TF32
    for got, want in zip(outs[1], outs[0]):
        assert ((got.float() - want.float()).norm() / want.float().norm()).item() < tol
    assert all(torch.equal(a, b) for a, b in zip(outs[1], outs[2]))


@pytest.mark.parametrize("conv", ["gemm", "fused"])
@pytest.mark.parametrize("name,precision", [("layernorm", "fp32"), ("no_tricks", "bf16")])
def test_matmul_stacked_runs_are_bit_identical_and_members_match_separate_runs(name, precision, conv, data):
    cfg = cfg_of(name, precision=precision, stacked_conv=conv)
    first, again = stacked_histories(cfg, data, k=2), stacked_histories(cfg, data, k=2)
    assert [first_difference(a, b) for a, b in zip(first, again)] == [None] * 2
    rel = 5e-2 if precision == "bf16" else 1e-2  # separate runs' cuDNN convs: bf16, or TF32 in fp32
    for seed, member in enumerate(first):
        alone = history(dataclasses.replace(cfg, seed=seed), data)
        assert [v for _, v in member["train/loss"]] == pytest.approx([v for _, v in alone["train/loss"]], rel=rel)


@pytest.mark.parametrize("name", ["batchnorm", "layernorm"])
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_fused_norm_runs_are_bit_identical_never_wait_and_match_pytorchs_ops(name, precision, data):
    cfg = cfg_of(name, precision=precision, stacked_conv="fused", fused_norm=True)
    try:  # CUDA graphs on (the default): a host sync inside the captured kernels' launches would raise here
        first = stacked_histories(cfg, data, k=2, hooks=[NoSyncInsideEpochs()])
        single = history(cfg, data)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert [first_difference(a, b) for a, b in zip(first, stacked_histories(cfg, data, k=2))] == [None] * 2
    assert first_difference(single, history(cfg, data)) is None
    rel = 5e-2 if precision == "bf16" else 1e-2  # PyTorch's norms and cuDNN's convs: bf16, or TF32 in fp32
    plain = dataclasses.replace(cfg, compute=dataclasses.replace(cfg.compute, fused_norm=False))
    for fused, seed in ((single, 0), (first[0], 0), (first[1], 1)):  # the single run, then each stacked member
        alone = history(dataclasses.replace(plain, seed=seed), data)
        assert [v for _, v in fused["train/loss"]] == pytest.approx([v for _, v in alone["train/loss"]], rel=rel)
