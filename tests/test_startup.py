"""Sweep and stress workers start again for every phase and stress config: they import nothing they have no use for."""
import pytest

from benchmarks.startup import heavy_imports


@pytest.mark.parametrize("module", ["experiments.sweep", "experiments.stress"])
def test_a_worker_module_imports_no_plotting_and_no_optimizer(module):
    """matplotlib.pyplot and scipy.optimize cost a worker about 1.3 s each start (benchmarks.startup); only the
    coordinator draws and fits, and it imports them when it does."""
    assert heavy_imports(module) == []
