"""profile_step on the CPU: a real stacked run profiled, its ops' times per step, bad input refused before anything runs."""
import pandas as pd
import pytest

from benchmarks.profile_step import main, parse
from conftest import DATA_DIR


def test_a_stacked_step_is_profiled_by_op(mnist_dir, tmp_path, capsys):
    assert main(["--device", "cpu", "--members", "2", "--steps", "2", "--precision", "fp32", "--data-dir", str(DATA_DIR),
                 "--out", str(tmp_path)]) == 0
    ops = pd.read_csv(tmp_path / "profile_step-cpu-fp32-k2-ops.csv")
    assert ops.share.sum() == pytest.approx(1) and ops.ms_per_step.is_monotonic_decreasing and (ops.ms_per_step > 0).all()
    per_step = ops.set_index("name").calls_per_step
    # 3 grouped convs a step: their backward once each (the images need no input gradient)
    assert per_step["aten::convolution_backward"] == 3 and per_step["aten::_fused_adam_"] == 1  # one update a step
    assert "ms per step" in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [(["--members", "0"], "--members 0"),
                                          (["--steps", "469"], "--steps 469 x batch 128 is more than the 60,000")])
def test_bad_input_is_one_line(argv, message, capsys):
    with pytest.raises(SystemExit) as stop:
        parse(argv)
    err = capsys.readouterr().err
    assert stop.value.code == 2 and err.count("\n") == 1 and message in err
