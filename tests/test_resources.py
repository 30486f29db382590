"""The memory check's estimate against what a process really uses, on the CPU (peak resident memory)."""
import os
import subprocess
import sys

from conftest import WITH_ROOT
from cookbook.config import Config, merge, validate
from cookbook.resources import memory_estimate

PEAK = """
import sys, torch
from cookbook.config import Config, merge, validate
from cookbook.model import build_model
from cookbook.train import EVAL_BATCH, evaluate
torch.set_num_threads(1)
cfg = validate(merge(Config(), {"model": {"width": float(sys.argv[1])}}))
model, x, y = build_model(cfg.model), torch.randn(EVAL_BATCH, 1, 28, 28), torch.zeros(EVAL_BATCH, dtype=torch.long)
def peak():  # this process's own high-water mark (ru_maxrss would start at the parent's: it survives exec)
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM")) * 1024
before = peak()
evaluate(model, x, y)
print(peak() - before)
"""


def test_a_small_batch_is_estimated_with_its_test_pass_which_needs_more():
    """At batch 8 the training's own activations are small; the test pass's 1000 images at width 4 took ~800 MB."""
    cfg = validate(merge(Config(), {"model": {"width": 4.0}, "data": {"batch_size": 8}}))
    done = subprocess.run([sys.executable, "-c", PEAK, "4"], env={**os.environ, **WITH_ROOT}, capture_output=True, text=True,
                          timeout=300)
    test_pass = int(done.stdout.strip() or 0)
    assert test_pass > 300e6, done.stderr[-2000:]  # it did measure the pass
    assert memory_estimate(cfg) > test_pass
