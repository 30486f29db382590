"""The device path, checked on the CPU: one index transfer per epoch, host reads only at flushes, determinism switches."""
import dataclasses

import pytest
import torch
from torch.overrides import TorchFunctionMode

from cookbook.data import batches, on_device
from cookbook.determinism import CUBLAS_WORKSPACE, configure
from cookbook.hooks import Hook, Recorder
from cookbook.stacked import train_stacked
from cookbook.step import StepRunner, step_stats
from cookbook.train import train

READS = {"tolist", "item", "__bool__", "__float__", "__int__", "__index__", "numpy", "cpu"}  # each one waits for a GPU


class HostReads(TorchFunctionMode):
    """Counts tensor-to-Python reads: on CUDA every one of them is a device-to-host transfer and a sync."""

    def __init__(self):
        super().__init__()
        self.reads: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in READS:
            self.reads.append(func.__name__)
        return func(*args, **(kwargs or {}))


class CountDuringEpochs(Hook):
    """Counts host reads from each epoch's start to its end (training steps, flushes, evaluation)."""

    def __init__(self):
        self.per_epoch, self.mode = [], None

    def on_epoch_start(self, epoch):
        self.mode = HostReads().__enter__()

    def on_epoch_end(self, epoch, metrics):
        self.mode.__exit__(None, None, None)
        self.per_epoch.append(self.mode.reads)


def test_host_reads_are_one_per_flush_plus_the_epoch_totals_and_evaluation(tiny_cfg, tiny_data):
    counter = CountDuringEpochs()
    train(tiny_cfg, tiny_data, [counter])  # 8 steps per epoch, flush every 3: flushes after steps 2, 5, 7
    flushes = -(-8 // tiny_cfg.monitor.flush_every)
    assert [len(r) for r in counter.per_epoch] == [flushes + 2] * tiny_cfg.epochs  # + epoch sums + evaluation
    assert set(counter.per_epoch[0]) == {"tolist"}


def test_stacked_host_reads_do_not_grow_with_members(tiny_cfg, tiny_data):
    counts = []
    for k in (1, 3):
        counter = CountDuringEpochs()
        cfgs = [dataclasses.replace(tiny_cfg, seed=s) for s in range(k)]
        train_stacked(cfgs, tiny_data, [[counter]] + [[] for _ in cfgs[1:]])
        counts.append([len(r) for r in counter.per_epoch])
    assert counts[0] == counts[1] == [-(-8 // tiny_cfg.monitor.flush_every) + 2] * tiny_cfg.epochs


def test_epoch_indices_reach_the_device_as_the_same_batches():
    order = batches(70, 32, torch.Generator().manual_seed(3))
    moved = on_device(order, torch.device("cpu"))
    assert [len(b) for b in moved] == [32, 32, 6]
    assert all(torch.equal(a, b) for a, b in zip(order, moved))
    stacked = on_device([torch.stack(b, 1) for b in zip(order, order)], torch.device("cpu"))
    assert [tuple(b.shape) for b in stacked] == [(32, 2), (32, 2), (6, 2)] and torch.equal(stacked[2][:, 1], order[2])


def test_step_stats_rows_and_clipped_flag():
    stats = step_stats(torch.tensor([2.0, 3.0]), torch.tensor([0.5, 4.0]), max_norm=1.0)
    assert stats.tolist() == [[2.0, 3.0], [0.5, 4.0], [0.0, 1.0]]
    assert step_stats(torch.tensor(2.0), torch.tensor(9.0), None).tolist() == [[2.0], [9.0], [0.0]]


def test_runner_without_graphs_calls_the_update_every_step():
    calls = []
    runner = StepRunner(lambda idx, norms: calls.append((idx.tolist(), norms)) or "out", graphs=False)
    assert [runner(torch.tensor([i]), i == 1) for i in range(3)] == ["out"] * 3
    assert calls == [([0], False), ([1], True), ([2], False)]


@pytest.fixture
def restore_determinism():
    yield
    configure(False, torch.device("cpu"))


def test_deterministic_switches_on_for_cuda_only_and_are_reported(restore_determinism, monkeypatch):
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # so that monkeypatch restores it: configure() sets it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    tags = configure(True, torch.device("cuda"))
    assert torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.deterministic
    assert not torch.backends.cudnn.benchmark
    assert tags == {"compute.deterministic": "true", "cudnn.deterministic": "true", "cudnn.benchmark": "false",
                    "cublas_workspace_config": CUBLAS_WORKSPACE}
    off = configure(False, torch.device("cuda"))
    assert not torch.are_deterministic_algorithms_enabled() and torch.backends.cudnn.benchmark
    assert off["compute.deterministic"] == "false" and off["cudnn.benchmark"] == "true"
    assert configure(True, torch.device("cpu"))["compute.deterministic"] == "false"  # nothing to switch on a CPU


def test_training_reports_the_determinism_tags(tiny_cfg, tiny_data):
    seen = {}

    class Tags(Hook):
        def on_start(self, info):
            seen.update(info["tags"])

    train(tiny_cfg, tiny_data, [Tags(), Recorder()])
    assert seen["compute.deterministic"] == "false" and seen["cuda_graphs"] == "false"  # a CPU run


def test_reproduce_warns_when_the_tracked_card_is_not_this_one(tiny_cfg, capsys, gpus, monkeypatch):
    from cookbook.reproduce import match_recorded

    gpus(1, "7")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    tags = {"device": "cuda:0", "torch_threads": str(torch.get_num_threads()), "torch_version": torch.__version__}
    match_recorded(tiny_cfg, {**tags, "gpu": "Fake GPU 0 (CUDA_VISIBLE_DEVICES=3)"})  # same card, other slot
    assert "not expected" not in capsys.readouterr().out
    match_recorded(tiny_cfg, {**tags, "gpu": "NVIDIA H100 80GB HBM3 (CUDA_VISIBLE_DEVICES=0)"})
    assert "gpu (tracked NVIDIA H100 80GB HBM3, here Fake GPU 0)" in capsys.readouterr().out
