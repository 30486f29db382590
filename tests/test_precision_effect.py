"""The bf16-vs-fp32 comparison on hand-made runs: pairs by seed, reruns, divergence and verdicts as computed by hand."""
import math
import statistics

import pandas as pd
import pytest

from analysis import load, precision_effect
from analysis.precision_effect import SETTING, compare
from analysis.select import latest
from analysis.stats import NOISE_VERDICTS


def runs(fp32_loss, bf16_loss, acc=(0.9, 0.91, 0.92), **setting):
    """One run per seed and precision; a None loss is a diverged run."""
    base = {k: None for k in SETTING} | {"config": "c", "lr": 1e-3, "epochs": 3} | setting
    rows = [base | {"seed": s, "precision": p, "final_loss": v, "test_acc": None if v is None else acc[s],
                    "diverged": v is None, "start_time": pd.Timestamp(0)}
            for p, values in (("fp32", fp32_loss), ("bf16", bf16_loss)) for s, v in enumerate(values)]
    return pd.DataFrame(rows)


def test_gap_is_judged_on_the_per_seed_differences():
    # Seeds vary widely but bf16 is 0.1 above fp32 on each: Welch would call it noise, the pairs do not.
    table = compare(runs([1.0, 2.0, 3.0], [1.1, 2.1, 3.12])).set_index("metric")
    loss = table.loc["final_loss"]
    assert loss["bf16 - fp32"] == pytest.approx(0.32 / 3)
    se = statistics.stdev([0.1, 0.1, 0.12]) / math.sqrt(3)
    assert loss["95% half-width"] == pytest.approx(4.302653 * se)  # t(0.975, 2 df)
    assert loss["verdict"] == NOISE_VERDICTS[False] and loss["paired_p"] < 0.01
    assert loss["fp32"] == "2.0000 ± 1.0000" and loss["pairs"] == 3
    assert table.loc["test_acc", "verdict"] == NOISE_VERDICTS[True]  # identical: within any noise
    mixed = compare(runs([1.0, 2.0, 3.0], [1.1, 1.9, 3.05])).set_index("metric").loc["final_loss"]
    assert mixed["verdict"] == NOISE_VERDICTS[True]
    # Two pairs 0.01 and 0.02 apart: 2 SE says "outside", the t-test (p 0.20) does not; the verdict follows the t-test.
    two = compare(runs([0.10, 0.20], [0.11, 0.22])).set_index("metric").loc["final_loss"]
    assert two["paired_p"] > 0.05 and two["verdict"] == NOISE_VERDICTS[True]


def test_only_the_latest_run_of_a_seed_and_only_matching_settings_pair():
    old = runs([1.0, 2.0], [9.0, 9.0])
    new = runs([1.0, 2.0], [1.1, 2.1]).assign(start_time=pd.Timestamp(1))
    other_setting = runs([5.0, 5.0], [0.0, 0.0], epochs=1)
    sgd = runs([7.0, 7.0], [7.5, 7.5], optimizer="sgd")  # not a rerun of the Adam runs: its own setting
    loss = compare(latest(pd.concat([new, old, other_setting, sgd]), [*SETTING, "seed", "precision"])).set_index("config")
    loss = loss[loss.metric == "final_loss"]
    assert list(loss.pairs) == [2, 2, 2]  # one row per setting, none mixed, no rerun counted twice
    assert loss.loc["c (optimizer=sgd, epochs=3)", "bf16 - fp32"] == pytest.approx(0.5)
    assert loss.loc["c (optimizer=None, epochs=3)", "bf16 - fp32"] == pytest.approx(0.1)
    assert loss.loc["c (optimizer=None, epochs=1)", "bf16 - fp32"] == pytest.approx(-5.0)


def test_diverged_runs_leave_their_pair_out_and_are_counted():
    loss = compare(runs([1.0, 2.0, 3.0], [1.1, None, 3.1])).set_index("metric").loc["final_loss"]
    assert loss["pairs"] == 2 and loss["diverged fp32/bf16"] == "0/1"
    gap = runs([1.0, 2.0, 3.0], [1.1, 2.1, 3.1])
    gap.loc[0, "test_acc"] = float("nan")  # a value the store lacks: only that metric loses the pair
    assert compare(gap).set_index("metric").pairs.to_dict() == {"final_loss": 3, "test_acc": 2}
    one = compare(runs([1.0], [2.0])).set_index("metric").loc["final_loss"]
    assert one["pairs"] == 1 and one["verdict"] == NOISE_VERDICTS[None]


def test_a_seed_in_one_precision_only_is_not_paired():
    assert compare(runs([1.0, 2.0], [])).empty


def test_no_comparable_pair_says_why_and_prints_no_nan(monkeypatch, capsys):
    """bf16 diverged on every seed: no mean ± std to give, no seed noise to judge; the verdict says so, the table n/a."""
    table = compare(runs([1.0, 2.0, 3.0], [None, None, None])).set_index("metric")
    assert table.verdict.tolist() == ["no comparable pair: bf16 diverged 3/3"] * 2 and table.pairs.tolist() == [0, 0]
    assert table.loc["final_loss", "fp32"] == table.loc["final_loss", "bf16"] == "n/a"
    assert compare(runs([1.0], [2.0])).set_index("metric").loc["final_loss", "fp32"] == "1.0000 ± n/a"  # one pair: no std
    lacking = runs([1.0, 2.0], [1.1, 2.1]).assign(test_acc=None)
    assert compare(lacking).set_index("metric").loc["test_acc", "verdict"] == "no comparable pair: 2/2 pairs lack test_acc"
    monkeypatch.setattr(load, "check_store", lambda: None)
    monkeypatch.setattr(precision_effect, "precision_runs", lambda _: runs([1.0, 2.0, 3.0], [None, None, None]))
    assert precision_effect.main([]) == 0 and "nan" not in capsys.readouterr().out
