"""`python -m cookbook train|reproduce` through the real MLflow path on a temporary store."""
import json
import math
import os
import shlex
import shutil
import subprocess
import sys

import mlflow
import pandas as pd
import pytest
import torch
import yaml
from mlflow import MlflowClient

from conftest import CONFIGS_DIR, TINY_FLAGS, WITH_ROOT, created_store, only_run
from cookbook.cli import build_parser, main, print_where, stop_note
from cookbook.config import flatten, load_config
from cookbook.data import MD5, raw_dir
from cookbook.logged import dataset_inputs
from cookbook.tracking import OVERRIDES_TAG


def test_tracked_run_has_config_tags_metrics_and_artifacts(mnist_dir, tracking, capsys, tmp_path):
    assert main(["train", "--config", "all_tricks", "--seed", "7", *TINY_FLAGS]) == 0
    assert not [p.name for p in tmp_path.iterdir() if p.name in ("checkpoints", "mlflow-spool")]  # emptied, then removed
    run = only_run()
    client = MlflowClient()
    assert run.info.status == "FINISHED"
    cfg = load_config("all_tricks", CONFIGS_DIR, {"seed": 7})
    assert run.data.params["config.optim.max_norm"] == "1.0" and run.data.params["config.seed"] == "7"
    assert set(run.data.params) == {f"config.{k}" for k in flatten(cfg)}
    tags = run.data.tags
    assert tags["config"] == "all_tricks" and tags["diverged"] == "false" and tags["seed"] == "7"
    assert len(tags["git_commit"]) == 40 and tags["torch_version"] and tags["device"] == "cpu"
    assert int(tags["param_count"]) == 94410
    assert {tags[f"data_md5.{k}"] for k in MD5} == set(MD5.values())
    assert tags["mlflow.note.content"].startswith("BatchNorm + 1 epoch")
    assert tags["overrides"].split(",") == ["data.batch_size", "data.data_dir", "data.test_subset", "data.train_subset",
                                            "epochs", "monitor.flush_every", "monitor.layer_every", "monitor.snapshot_steps",
                                            "seed"]  # what TINY_FLAGS and --seed set; no treatment key
    assert len(client.get_metric_history(run.info.run_id, "train/loss")) == 16
    assert [m.step for m in client.get_metric_history(run.info.run_id, "test/acc")] == [1, 2]
    local = client.download_artifacts(run.info.run_id, "", str(tmp_path))
    snapshots = pd.read_csv(f"{local}/grad_norms/snapshots.csv")
    assert sorted(snapshots.step.unique()) == [0, 5, 9] and (snapshots.grad_norm > 0).all()
    assert "optim:\n  name: adam" in open(f"{local}/config.yaml").read()
    inputs = {i.dataset.name: i for i in run.inputs.dataset_inputs}  # the run page's Datasets section
    assert sorted(inputs) == ["mnist-test", "mnist-train"]
    train_set = inputs["mnist-train"]
    assert [(t.key, t.value) for t in train_set.tags] == [("mlflow.data.context", "training")]
    assert json.loads(train_set.dataset.source)["md5"] == {k: v for k, v in MD5.items() if k.startswith("train")}
    assert json.loads(train_set.dataset.profile) == {"num_rows": 256, "full_split_rows": 60000, "subset": 256}
    assert json.loads(inputs["mnist-test"].dataset.profile)["num_rows"] == 200 and len(train_set.dataset.digest) == 8
    out = capsys.readouterr().out
    assert run.info.run_id in out and "mlflow ui --backend-store-uri" in out


def test_each_run_shows_its_own_subset_and_folder_among_an_experiments_datasets(tracking, tmp_path):
    """MLflow keeps one dataset per name and digest in an experiment: a digest of the files alone gave every later run
    the first run's subset and folder."""
    client = MlflowClient(created_store(tracking))
    experiment = client.create_experiment("datasets")
    cfgs = [load_config("all_tricks", CONFIGS_DIR, {"data": data}) for data in
            ({"train_subset": 256}, {"train_subset": 320}, {"train_subset": 256, "data_dir": str(tmp_path / "elsewhere")})]
    for cfg in cfgs:
        run_id = client.create_run(experiment).info.run_id
        client.log_inputs(run_id, dataset_inputs(cfg, MD5))
        train_set = next(i.dataset for i in client.get_run(run_id).inputs.dataset_inputs if i.dataset.name == "mnist-train")
        assert json.loads(train_set.profile)["num_rows"] == cfg.data.train_subset
        assert json.loads(train_set.source)["uri"] == str(raw_dir(cfg.data.data_dir))


def test_the_printed_mlflow_ui_command_survives_a_space_in_the_store_path(tracking, tmp_path, capsys):
    (tmp_path / "my runs").mkdir()
    uri = created_store(f"sqlite:///{tmp_path}/my runs/mlflow.db")
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    print_where(client.create_run(client.create_experiment("where")).info.run_id)
    command = next(line for line in capsys.readouterr().out.splitlines() if "mlflow ui" in line)
    assert shlex.split(command.split("open it: ")[1])[:4] == ["mlflow", "ui", "--backend-store-uri", uri]


def test_diverged_run_is_finished_tagged_and_finite(mnist_dir, tracking):
    assert main(["train", "--config", "no_tricks", "--optimizer", "sgd", "--lr", "50", *TINY_FLAGS]) == 0
    run = only_run()
    assert run.info.status == "FINISHED" and run.data.tags["diverged"] == "true"
    assert {"optim.lr", "optim.name"} <= set(run.data.tags["overrides"].split(","))
    step = int(run.data.tags["diverged_step"])
    history = MlflowClient().get_metric_history(run.info.run_id, "train/loss")
    assert len(history) == step and all(math.isfinite(m.value) for m in history)


@pytest.mark.parametrize("argv,message", [
    (["--config", "nope"], "unknown config 'nope'; available: all_tricks, batchnorm, layernorm, no_tricks"),
    (["--lr", "-1"], "optim.lr=-1.0 must be a positive number"),
    (["--lr", "0"], "optim.lr=0.0 must be a positive number"),
    (["--epochs", "0"], "epochs=0 must be >= 1"),
    (["--norm", "instance"], "model.norm='instance' is not valid; choose one of: none, batch, layer"),
    (["--init", "zeros"], "model.init='zeros' is not valid; choose one of: kaiming, default"),
    (["--optimizer", "lion"], "optim.name='lion' is not valid; choose one of: adam, adamw, sgd"),
    (["--width", "-1"], "model.width=-1.0 must be a finite number > 0"),
    (["--set", "optim.lr"], "must look like KEY=VALUE"),
    (["--epochs", "1:30"], "epochs='1:30' must be an integer"),  # YAML 1.1: 90 (base 60)
    (["--set", "optim.lr=1e-3", "--set", "optim.lr.x=1"], "'optim.lr.x' sets a key inside 'optim.lr', which is set to 0.001"),
    (["--width", "1000"], "model.width=1000 model.depth=3 needs about"),  # 295 GB of Adam state and activations
    (["--width", ".inf"], "model.width=inf must be a finite number"),
    (["--warmup-epochs", ".inf"], "schedule.warmup_epochs=inf must be a finite number"),
    (["--lr", ".nan"], "optim.lr=nan must be a finite number"),
    (["--train-subset", "100000"], "data.train_subset=100000 must be in 2..60000 (MNIST's training images) or none"),
    (["--test-subset", "10001"], "data.test_subset=10001 must be in 1..10000 (MNIST's test images) or none"),
    (["--device", "cuda:x"], "device='cuda:x': the index after ':' must be a number"),
    (["--set", "device=cuda:"], "device='cuda:': the index after ':' must be a number"),
    (["--device", "cpu", "--set", "compute.stacked_conv=fused"],
     "compute.stacked_conv='fused' runs Triton kernels on a CUDA GPU, not on cpu; choose one of: auto, gemm, hybrid, grouped"),
    (["--device", "cpu", "--set", "compute.stacked_conv=gemm+fused+grouped"],
     "compute.stacked_conv='gemm+fused+grouped' runs Triton kernels on a CUDA GPU, not on cpu; choose one of: auto, gemm"),
    (["--set", "compute.stacked_conv=gemm+gemm"], "compute.stacked_conv='gemm+gemm' must be one of auto, gemm, hybrid"),
    pytest.param(["--device", "cuda"], "device='cuda' is not available here (0 CUDA devices); choose cpu",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")),
])
def test_bad_input_is_one_line_and_creates_no_run(tracking, capsys, monkeypatch, argv, message):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # conftest's Triton interpreter would let 'fused' run on the CPU
    assert main(["train", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {message}" or (message in err and err.count("\n") == 0)
    assert mlflow.get_experiment_by_name("stability-cookbook") is None


def test_config_file_that_is_not_utf8_is_one_line(tracking, capsys, tmp_path):
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("description: \xe9t\xe9\n".encode("latin-1"))
    assert main(["train", "--config", str(bad)]) == 2
    assert capsys.readouterr().err.strip() == f"error: {bad}: not UTF-8 text (byte 0xe9 at offset 13)"


def test_unwritable_data_dir_is_one_line_error(tracking, capsys):
    assert main(["train", "--data-dir", "/proc/no-such-dir", "--no-system-metrics"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: cannot write MNIST under /proc/no-such-dir")
    assert mlflow.get_experiment_by_name("stability-cookbook") is None


def test_corrupt_mnist_names_the_file_and_creates_no_run(mnist_dir, tracking, tmp_path, capsys):
    shutil.copytree(raw_dir(mnist_dir), raw_dir(tmp_path))
    (raw_dir(tmp_path) / "train-images-idx3-ubyte").write_bytes(b"\0" * 100)
    assert main(["train", "--data-dir", str(tmp_path), "--no-system-metrics"]) == 2
    err = capsys.readouterr().err
    assert "MD5 mismatch" in err and "train-images-idx3-ubyte" in err
    assert mlflow.get_experiment_by_name("stability-cookbook") is None



def test_dry_run_prints_the_resolved_config(capsys):
    assert main(["train", "--config", "all_tricks", "--lr", "3e-3", "--max-norm", "none", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "name: all_tricks" in out and "lr: 0.003" in out and "max_norm: null" in out and "norm: batch" in out


@pytest.mark.parametrize("argv,key,value", [
    (["--seed", "010"], "seed", 10),  # YAML 1.1: octal 8
    (["--train-subset", "0400"], "data.train_subset", 400),  # YAML 1.1: 256
    (["--lr", "1e-3"], "optim.lr", 0.001),  # YAML 1.1: a string
    (["--data-dir", "/tmp/mnist #2"], "data.data_dir", "/tmp/mnist #2"),  # a text key as typed: '#' is no comment
    (["--data-dir", "2024"], "data.data_dir", "2024"),  # YAML: an integer, refused as "must be a string"
    (["--set", "monitor.snapshot_steps=[0, 010]"], "monitor.snapshot_steps", [0, 10]),
])
def test_flag_values_mean_what_they_say(argv, key, value, capsys):
    assert main(["train", *argv, "--dry-run"]) == 0
    resolved = yaml.safe_load(capsys.readouterr().out)
    for name in key.split("."):
        resolved = resolved[name]
    assert resolved == value


@pytest.mark.parametrize("argv,note", [(["train"], "any run it had started ended KILLED"), (["train", "--no-track"], "nothing was tracked"),
                                       (["reproduce", "abc"], "nothing was tracked"), (["sync"], "spool files not yet stored are kept")])
def test_a_signal_says_what_it_left_for_each_command(argv, note):
    assert stop_note(build_parser().parse_args(argv)).startswith(note)


def test_a_config_file_that_only_its_overrides_make_valid_trains(mnist_dir, tracking, tmp_path):
    """The file as written is the overrides tag's base: validated alone, it refused what --dry-run accepted."""
    (tmp_path / "tiny_lr.yaml").write_text("# why: an LR below the default lr_min\noptim:\n  lr: 1.0e-7\n")
    assert main(["train", "--config", str(tmp_path / "tiny_lr.yaml"), "--set", "schedule.lr_min=0", *TINY_FLAGS]) == 0
    assert "schedule.lr_min" in only_run().data.tags[OVERRIDES_TAG].split(",")


def test_no_track_trains_without_mlflow(mnist_dir, tracking, capsys):
    assert main(["train", "--config", "no_tricks", *TINY_FLAGS, "--epochs", "1", "--no-track"]) == 0
    assert "no_tricks s0: finished after 8/8 steps" in capsys.readouterr().out
    assert mlflow.get_experiment_by_name("stability-cookbook") is None


def test_no_track_trains_without_mlflow_installed(mnist_dir, tmp_path):
    """The library needs no MLflow: with `import mlflow` made to fail, --no-track still trains."""
    code = ("import sys; sys.modules['mlflow'] = None\nfrom cookbook.cli import main\n"
            f"sys.exit(main(['train', '--config', 'no_tricks', '--no-track', *{TINY_FLAGS!r}]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env={**os.environ, **WITH_ROOT},
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "no_tricks s0: finished after 16/16 steps" in done.stdout


def test_logged_model_loads_and_scores_the_logged_test_accuracy(mnist_dir, tracking, tiny_data, tmp_path, monkeypatch):
    import mlflow.pytorch

    from cookbook.train import evaluate

    monkeypatch.chdir(tmp_path)  # the model folder is staged in ./mlflow-spool and removed once stored
    assert main(["train", "--config", "batchnorm", *TINY_FLAGS]) == 0
    run = only_run()
    [output] = run.outputs.model_outputs
    model = mlflow.pytorch.load_model(f"models:/{output.model_id}")
    loss, acc = evaluate(model, tiny_data.test_x, tiny_data.test_y)
    assert acc == run.data.metrics["test/acc"] and loss == pytest.approx(run.data.metrics["test/loss"], rel=1e-6)
    logged = MlflowClient().get_logged_model(output.model_id)
    assert output.step == 16 and logged.source_run_id == run.info.run_id
    linked = {m.key: m for m in logged.metrics}  # the final epoch's metrics, each with the set it was measured on
    assert linked["test/acc"].value == acc and linked["test/acc"].dataset_name == "mnist-test"
    assert linked["epoch/train_loss"].dataset_name == "mnist-train" and linked["test/acc"].step == 2
    assert len(MlflowClient().get_metric_history(run.info.run_id, "test/acc")) == 2  # one point per epoch, no duplicate
    assert not list((tmp_path / "mlflow-spool").glob("*"))
    elsewhere = tmp_path / "elsewhere"  # a folder where `import cookbook` finds nothing: the model brings its code
    elsewhere.mkdir()
    load = f"import mlflow.pytorch; print(type(mlflow.pytorch.load_model('models:/{output.model_id}')).__name__)"
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    done = subprocess.run([sys.executable, "-c", load], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=300)
    assert done.stdout.strip() == "StableNet", done.stderr[-2000:]
    assert main(["train", "--config", "batchnorm", "--no-log-model", "--experiment", "bare", *TINY_FLAGS]) == 0
    assert not only_run("bare").outputs.model_outputs


@pytest.mark.parametrize("argv", [["sync"], ["resume", "0" * 32], ["reproduce", "0" * 32]])
def test_a_store_away_while_a_command_reads_it_is_one_line_about_the_store(argv, tmp_path, monkeypatch, capsys):
    """Not a traceback, and not 'no run': the store did not answer."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")  # port 9: nothing listens
    monkeypatch.chdir(tmp_path)
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: tracking store http://127.0.0.1:9: API request") and err.count("\n") == 1


def test_sync_names_the_running_runs_it_cannot_judge_and_closes_one_on_the_users_word(tracking, capsys):
    """A RUNNING run without a process tag (older versions) or with another host's is left RUNNING, with a line saying
    why (resume pointed to sync, which said nothing); `--close` ends it KILLED with its steps; a bad --close is one line."""
    from mlflow.entities import Metric, Param

    from cookbook.stop import process_id
    client = MlflowClient()
    experiment = client.create_experiment("old")
    old, other, alive, done, deleted = (client.create_run(experiment, tags=tags).info.run_id for tags in
                                        ({}, {"process": "elsewhere:123:456"}, {"process": process_id()}, {}, {}))
    client.delete_run(deleted)  # sync lists only live runs: --close closed nothing and said nothing
    client.log_batch(old, metrics=[Metric("train/loss", 2.0, 0, step) for step in range(3)], params=[Param("config.epochs", "2")])
    client.set_terminated(done, "FINISHED")
    assert main(["sync"]) == 0
    out = capsys.readouterr().out
    assert f"run {old}: left RUNNING: its tags name no training process (made by an older version); once it trains no " \
           f"more, `python -m cookbook sync --close {old}`" in out
    assert f"run {other}: left RUNNING: it trains on another host (elsewhere:123:456): run sync there" in out
    assert alive not in out and {client.get_run(r).info.status for r in (old, other, alive)} == {"RUNNING"}
    refusals = ((done, "the run is FINISHED, not RUNNING"), ("0" * 32, "no such run"), (alive, f"its process {process_id()} is alive"),
                (deleted, "the run (or its experiment) is deleted; restore it first"))
    for bad, message in refusals:
        assert main(["sync", "--close", bad, "--close", old]) == 2
        assert f"error: --close {bad}: {message}" in capsys.readouterr().err
    assert client.get_run(old).info.status == "RUNNING"  # nothing closed by a command refused
    assert main(["resume", old]) == 2 and f"once it trains no more, `python -m cookbook sync --close {old}`, then resume" in \
        capsys.readouterr().err
    assert main(["sync", "--close", old]) == 0
    assert f"run {old}: closed as asked; ended KILLED with the 3 steps it stored" in capsys.readouterr().out
    assert client.get_run(old).info.status == "KILLED" and client.get_run(old).data.tags["steps_run"] == "3"
    assert client.get_run(other).info.status == "RUNNING"
