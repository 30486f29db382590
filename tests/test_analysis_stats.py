"""The analysis' statistics and tables as pure functions: closed forms, scipy, hand-built frames (no MLflow store)."""
import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

from analysis.lr import boundaries, latest_per_config, size_table, warmup_size
from analysis.select import with_scale
from analysis.stats import capped_losses, layer_spread, lr_sensitivity, mean_ci95, noise_verdict, within_noise


def test_stats_by_hand():
    mean, half = mean_ci95([0.1, 0.3])
    assert mean == pytest.approx(0.2) and half == pytest.approx(12.7062 * 0.141421 / math.sqrt(2), rel=1e-4)
    assert lr_sensitivity([0.5, 0.2, float("inf")], math.log(10)) == pytest.approx((0.5 + 0.2 + math.log(10)) / 3 - 0.2)
    assert lr_sensitivity([3.0, 0.2], 2.0) == pytest.approx((2.0 + 0.2) / 2 - 0.2)  # capped at the loss at init
    assert layer_spread([0.5, 2.0]) == 4.0


def test_seed_noise_needs_two_seeds_a_side_and_a_diverged_seed_counts_as_the_loss_at_init():
    assert within_noise([0.1, 0.12], [0.5, 0.52]) is False and within_noise([0.1, 0.3], [0.12, 0.32]) is True
    assert within_noise([0.1], [0.5]) is None and noise_verdict([0.1], [0.5]) == "seed noise unknown (fewer than 2 seeds)"
    assert within_noise([0.1, 0.1], [0.1, 0.1]) is True  # no difference is within noise, even none
    assert within_noise([0.1, 0.3], [0.2, 0.4], paired=True) is False and within_noise([0.1, 0.3], [0.2, 0.4]) is True
    assert capped_losses([0.1, 0.05, float("nan"), 3.0], [False, True, False, False], 2.0).tolist() == [0.1, 2.0, 2.0, 2.0]


def test_seed_noise_is_the_t_test_at_five_percent_welch_or_paired():
    """The verdict agrees with scipy's Welch and paired t-tests on random samples of 2-5 seeds, and a gap of 2.8 SE
    with 2 seeds a side (p = 0.11) is within noise, where a flat "2 SE" rule called it outside."""
    rng = np.random.default_rng(0)
    for _ in range(300):
        n = int(rng.integers(2, 6))
        a, b = rng.normal(0, 1, n), rng.normal(rng.uniform(0, 3), rng.uniform(0.2, 2), n)
        assert within_noise(a, b) == (scipy_stats.ttest_ind(a, b, equal_var=False).pvalue >= 0.05)
        assert within_noise(a, b, paired=True) == (scipy_stats.ttest_rel(a, b).pvalue >= 0.05)
    assert within_noise([0.1, 0.3], [0.5, 0.7]) is True


def test_seed_noise_leaves_out_a_seed_missing_its_value_and_needs_two_finite_values():
    """One of 3 seeds lacks its final loss: the 2 left are judged as scipy judges them, not "fewer than 2 seeds"."""
    nan, inf = float("nan"), float("inf")
    welch = lambda a, b: bool(scipy_stats.ttest_ind(a, b, equal_var=False).pvalue >= 0.05)  # noqa: E731
    assert within_noise([0.1, 0.12, nan], [0.5, 0.52, 0.55]) is welch([0.1, 0.12], [0.5, 0.52, 0.55]) is False
    assert within_noise([0.1, 0.3, nan], [0.12, inf, 0.33]) is welch([0.1, 0.3], [0.12, 0.33]) is True
    pairs = [nan, 0.1, 0.3, 0.5], [0.2, 0.2, nan, 0.7]  # only the 2nd and 4th pairs are whole
    assert within_noise(*pairs, paired=True) is bool(scipy_stats.ttest_rel([0.1, 0.5], [0.2, 0.7]).pvalue >= 0.05) is True
    assert within_noise([0.1, 0.3, nan], [0.2, 0.4, 0.5], paired=True) is False  # the 2 whole pairs exactly 0.1 apart
    assert within_noise([0.1, nan, inf], [0.5, 0.52]) is None and within_noise([0.1, 0.2], [nan, 0.3], paired=True) is None


def test_size_table_scores_each_lr_on_all_its_seeds():
    """One seed of two diverged at LR 0.1: its survivor's 0.05 must not make 0.1 the best LR."""
    init = math.log(10)
    sized = pd.DataFrame({"params": 1000, "warmup": "no warmup", "width": 1.0, "depth": 3, "seed": [0, 1, 0, 1],
                          "lr": [1e-3, 1e-3, 1e-1, 1e-1], "final_loss": [0.3, 0.3, 0.05, float("nan")],
                          "diverged": [False, False, False, True]})
    row = size_table(sized, init).iloc[0]
    assert row["best LR"] == 1e-3 and row["best final loss"] == 0.3
    assert row["sensitivity"] == pytest.approx((0.3 + (0.05 + init) / 2) / 2 - 0.3)
    every_lr_failed = size_table(sized.assign(diverged=True), init).iloc[0]
    assert math.isnan(every_lr_failed["best LR"]) and math.isnan(every_lr_failed["sensitivity"])  # not 0: not LR-robust
    assert every_lr_failed["note"] == "failed at every LR" and row["note"] == ""


def test_a_rerun_stress_study_replaces_the_older_one():
    newest_first = [{"config": "no_tricks", "boundary_lr": 0.5}, {"config": "no_tricks", "boundary_lr": 0.05},
                    {"config": "batchnorm", "boundary_lr": 1.0}]
    assert {c: r["boundary_lr"] for c, r in latest_per_config(newest_first).items()} == {"no_tricks": 0.5, "batchnorm": 1.0}


def test_warmup_starts_to_matter_at_the_first_size_where_the_rule_holds():
    rows = []
    for width, params, no_warm in ((0.5, 10_000, (0.2, 0.21)), (2.0, 100_000, (0.2, 2.0))):  # small: LR-robust anyway
        for warmup in (0.0, 1.0):
            for lr, loss in zip((1e-3, 1e-2), no_warm if not warmup else (0.2, 0.21)):
                rows.append({"config": "no_tricks", "seed": 0, "lr": lr, "width": width, "depth": 3, "warmup_epochs": warmup,
                             "param_count": params, "final_loss": loss, "diverged": False, "stress": None,
                             "overrides": "model.width,optim.lr,schedule.warmup_epochs", "start_time": 0, "epochs": 2,
                             "train_subset": None, "test_subset": None, "batch_size": 128, "precision": "fp32"})
    section = warmup_size(with_scale(pd.DataFrame(rows)))
    assert "Warmup starts to matter at **100,000 parameters**" in section.text and "it holds at 100,000)" in section.text


def test_stress_boundaries_carry_the_scale_of_their_trials():
    trials = with_scale(pd.DataFrame([{"config": "batchnorm", "stress": study, "epochs": 2, "train_subset": subset,
                                       "test_subset": 2000.0, "batch_size": 128, "precision": "fp32"}
                                      for study, subset in (("stress-batchnorm-1", 12800.0), ("stress-batchnorm-0", 256.0))]))
    report = {"config": "batchnorm", "study": "stress-batchnorm-1", "trials": 17, "largest_converged_lr": 0.285,
              "boundary_lr": 0.431, "boundary_lr_90ci": [0.335, 0.574], "pruning_saved": 0.18}  # an earlier study ran on 256
    assert ("- batchnorm: 17 trials, converged up to 0.285, boundary 0.431 [90% CI 0.335, 0.574]; pruning saved 18% of the "
            "steps. *Scale: 2 epochs on 12,800 training images, tested on 2,000, batch 128, fp32.*") in boundaries(trials, [report])
