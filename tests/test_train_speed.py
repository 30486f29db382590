"""train_speed's table from raw timings: one-off first-epoch costs apart, tracking overhead end to end and in the loop."""
import pandas as pd
import pytest

from benchmarks.train_speed import parse, summarise


def raw_rows() -> pd.DataFrame:
    """Two epochs per run: a slow first one (capture, autotuning), then the steady one; the tracked run takes 2 s more
    in all (creating and closing its run) and 0.1 s of its 2nd epoch in the tracker's on_metrics."""
    rows = []
    for mode, first, steady, run_s, hook_s in (("ours", 6.0, 1.0, 8.0, 0.0), ("ours+mlflow", 6.2, 1.1, 10.0, 0.2)):
        for epoch, seconds in ((1, first), (2, steady)):
            rows.append({"config": "batchnorm", "mode": mode, "repeat": 0, "epoch": epoch, "seconds": seconds,
                         "train_loss": 0.1, "hook_seconds": hook_s / 2, "run_seconds": run_s, "peak_rss_gb": 1.0})
    return pd.DataFrame(rows)


def test_the_first_epoch_is_reported_apart_and_overheads_are_whole_runs_and_the_loop():
    table = summarise(raw_rows(), n_train=60000, skip_epochs=1).set_index("mode")
    assert table.loc["ours", "s_per_epoch_median"] == 1.0 and table.loc["ours", "first_epoch_s"] == 6.0
    assert table.loc["ours", "samples_per_s"] == 60000 and table.loc["ours+mlflow", "vs_ours_pct"] == pytest.approx(10)
    assert table.loc["ours+mlflow", "tracking_overhead_pct"] == pytest.approx(25)  # 10 s vs 8 s per run
    assert table.loc["ours+mlflow", "tracking_in_loop_pct"] == pytest.approx(100 * 0.1 / 1.1)
    assert summarise(raw_rows(), n_train=60000).set_index("mode").loc["ours", "s_per_epoch_median"] == 3.5  # nothing skipped


def test_skip_epochs_defaults_to_one_when_runs_have_more_and_must_leave_one(capsys):
    assert parse(["--epochs", "2"]).skip_epochs == 1 and parse(["--epochs", "1"]).skip_epochs == 0
    with pytest.raises(SystemExit) as stop:
        parse(["--epochs", "2", "--skip-epochs", "2"])
    assert stop.value.code == 2
    assert capsys.readouterr().err.strip() == "error: skip_epochs=2: must be at least 0 and below --epochs (2)"
    with pytest.raises(SystemExit) as stop:
        parse(["--configs", ","])  # nothing to measure: one line, not a traceback after the runs
    assert stop.value.code == 2 and capsys.readouterr().err.strip() == "error: configs=',': name at least one config"
