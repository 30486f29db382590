"""The bf16-vs-fp32 comparison on hand-made runs: differences, standard errors and verdicts as computed by hand."""
import math

import pandas as pd
import pytest

from analysis.precision_effect import compare


def runs(fp32_loss, bf16_loss, acc=(0.9, 0.91, 0.92)):
    rows = [{"config": "c", "seed": s, "precision": p, "final_loss": v, "test_acc": acc[s]}
            for p, values in (("fp32", fp32_loss), ("bf16", bf16_loss)) for s, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_gap_within_and_outside_seed_noise():
    table = compare(runs([1.0, 2.0, 3.0], [2.0, 3.0, 4.0])).set_index("metric")
    loss = table.loc["final_loss"]
    assert loss["bf16 - fp32"] == pytest.approx(1.0)
    assert loss["2 SE"] == pytest.approx(2 * math.sqrt(1 / 3 + 1 / 3))
    assert loss["verdict"] == "within seed noise" and loss["fp32"] == "2.0000 ± 1.0000"
    assert table.loc["test_acc", "bf16 - fp32"] == pytest.approx(0.0)
    far = compare(runs([1.0, 1.1, 1.2], [3.0, 3.1, 3.2])).set_index("metric").loc["final_loss"]
    assert far["verdict"] == "outside seed noise" and far["welch_p"] < 0.001


def test_configs_with_fewer_than_two_seeds_per_side_are_skipped():
    assert compare(runs([1.0], [2.0])).empty
