"""Workers spread over the GPUs (one each, round robin) and the `gpu` label naming the physical card, on CPU."""
from cookbook.resources import gpu_label, visible_gpus
from experiments.workers import WORKER_INDEX_ENV, gpu_assignment, spawn

PROBE = "import os, sys\nopen(os.path.join(sys.argv[sys.argv.index('--out') + 1], str(os.getpid())), 'w')" \
        ".write(os.environ.get(sys.argv[sys.argv.index('--var') + 1], 'unset'))\n"  # a worker that says what it was given


def test_workers_take_the_gpus_round_robin():
    assert gpu_assignment(5, ["0", "1"]) == ["0", "1", "0", "1", "0"]  # more workers than GPUs: they share
    assert gpu_assignment(2, ["GPU-a", "GPU-b", "GPU-c"]) == ["GPU-a", "GPU-b"]
    assert gpu_assignment(3, []) == [None, None, None]  # no GPU: workers are started as before


def test_visible_gpus_are_the_parents_list_or_all(gpus):
    gpus(3)
    assert visible_gpus() == ["0", "1", "2"]
    gpus(2, "GPU-8f1c, GPU-77aa")  # UUIDs, as nvidia-smi -L prints them
    assert visible_gpus() == ["GPU-8f1c", "GPU-77aa"]
    gpus(2, "5,7,9")  # CUDA found only the first two
    assert visible_gpus() == ["5", "7"]
    gpus(0, "")
    assert visible_gpus() == []


def test_gpu_label_names_the_card_and_its_physical_id(gpus):
    gpus(2, "3,6")
    assert gpu_label("cuda:0") == "Fake GPU 0 (CUDA_VISIBLE_DEVICES=3)"
    assert gpu_label("cuda") == "Fake GPU 1 (CUDA_VISIBLE_DEVICES=6)"  # the current device
    gpus(4)
    assert gpu_label("cuda:2") == "Fake GPU 2 (CUDA_VISIBLE_DEVICES=2)"
    assert gpu_label("cpu") is None and gpu_label("mps") is None


def started_workers_see(tmp_path, monkeypatch, n: int, device: str | None = None,
                        variable: str = "CUDA_VISIBLE_DEVICES") -> list[str]:
    """An environment variable as each of n workers that spawn started saw it."""
    (tmp_path / "gpuprobe.py").write_text(PROBE)
    out = tmp_path / f"seen-{n}-{device}-{variable}"
    out.mkdir()
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    for proc in spawn("gpuprobe", ["--out", str(out), "--var", variable], n, device):
        assert proc.wait(timeout=60) == 0
    return sorted(path.read_text() for path in out.iterdir())


def test_spawn_gives_each_worker_one_of_the_parents_gpus(gpus, tmp_path, monkeypatch):
    gpus(2, "GPU-aaa,GPU-bbb")
    assert started_workers_see(tmp_path, monkeypatch, 3) == ["GPU-aaa", "GPU-aaa", "GPU-bbb"]
    assert started_workers_see(tmp_path, monkeypatch, 2, "cuda:1") == ["GPU-aaa,GPU-bbb"] * 2  # pinned: all visible
    gpus(0)
    assert started_workers_see(tmp_path, monkeypatch, 2) == ["unset", "unset"]
    assert started_workers_see(tmp_path, monkeypatch, 3, variable=WORKER_INDEX_ENV) == ["0", "1", "2"]  # its own seed
