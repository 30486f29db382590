"""The sweep's closing table: one row per swept setting, no result taken from a diverged cell."""
import optuna
import pandas as pd

from experiments.grid import cell_key, make_cells
from experiments.sweep_summary import print_summary, summary


def test_the_sweep_summary_keeps_widths_and_warmups_apart(capsys):
    cells = make_cells("no_tricks", "0,1", "", widths="0.5,2", warmups="0,1")
    table = pd.DataFrame([{**c, "cell": cell_key(c), "final_loss": 1.0 + c["width"] + c["warmup_epochs"] / 10,
                           "test_acc": 0.9, "diverged": False, "pruned": False} for c in cells])
    print_summary(table, {"done": 8, "total": 8}, 60)
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("no_tricks")]
    assert [(r[2], r[4], r[5], r[6]) for r in rows] == [("0.5", "0.0", "2", "1.5000"), ("0.5", "1.0", "2", "1.6000"),
                                                        ("2.0", "0.0", "2", "3.0000"), ("2.0", "1.0", "2", "3.1000")]


def test_the_sweep_summary_takes_no_final_loss_from_a_diverged_cell():
    """A cell that diverged in epoch 2 kept epoch 1's loss: averaged in, it would pass for a result."""
    study = optuna.create_study()
    for seed, loss, diverged in ((0, 0.3, False), (1, 0.9, True)):
        study.add_trial(optuna.trial.create_trial(
            params={"cell": f"no_tricks seed={seed}"}, value=loss,
            distributions={"cell": optuna.distributions.CategoricalDistribution([f"no_tricks seed={seed}"])},
            user_attrs={"config": "no_tricks", "seed": seed, "epoch/train_loss": loss, "test/acc": 0.9, "diverged": diverged}))
    table = summary(study)
    assert table.final_loss.tolist()[0] == 0.3 and table.final_loss.isna().tolist() == [False, True]
    assert table.test_acc.isna().tolist() == [False, True]
