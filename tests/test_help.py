"""Every command's --help: its description is the module docstring's first paragraph, whole."""
import importlib

import pytest

COMMANDS = ["experiments.sweep", "experiments.stress", "experiments.study", "analysis.cli", "analysis.precision_effect",
            "analysis.seed_table", "benchmarks.train_speed", "benchmarks.stacked_speed", "benchmarks.kernel_speed",
            "benchmarks.kernel_build", "benchmarks.fused_tiles", "benchmarks.profile_step", "benchmarks.study_cost"]


@pytest.mark.parametrize("module", COMMANDS)
def test_the_help_describes_the_command_in_whole_sentences(module, capsys):
    """Three descriptions stopped mid-sentence at the docstring's first line break ("... for a GPU" read as if one were
    needed; the docstring goes on "that need not be here")."""
    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).main(["--help"])
    assert done.value.code == 0
    description = capsys.readouterr().out.split("\n\n")[1]
    assert " ".join(description.split()) == " ".join(importlib.import_module(module).__doc__.split("\n\n")[0].split())
    assert description.rstrip().endswith((".", ")", "`"))
