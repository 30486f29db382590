"""The Triton stacked convolution, run by Triton's CPU interpreter: the gemm path's sums, forward and backward."""
import os
import subprocess
import sys

import pytest
import torch
from torch import nn

from conftest import ROOT
from cookbook.stacked import stack_layer
from cookbook.stacked_conv import StackedConvFunction


@pytest.fixture
def fused():
    """cookbook.fused_conv with its kernels run by Triton's interpreter, which conftest turns on where no GPU is visible."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs Triton's CPU interpreter (tests/test_gpu.py checks the kernels on a card)")
    from cookbook import fused_conv
    return fused_conv


def test_every_kernel_compiles_for_an_h100_without_spilling_registers():
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_build", "--arch", "90"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = [line.split() for line in done.stdout.splitlines()[1:19]]  # 3 kernels x 3 layers x bf16, fp32
    assert len(rows) == 18 and {(r[0], r[1]) for r in rows} >= {("forward", "bf16"), ("grad_weight", "fp32")}
    assert [r for r in rows if r[4] != "0"] == [], done.stdout  # spill_stores_bytes


def random_args(b, h, w, k, c, o, dtype=torch.float64):
    torch.manual_seed(0)
    return [torch.randn(b, h, w, k, c, dtype=dtype, requires_grad=True),
            torch.randn(k, 9 * c, o, dtype=dtype, requires_grad=True), torch.randn(k, o, dtype=dtype, requires_grad=True)]


# (B, H, W, K, C, O): one input channel (the first layer), channels and outputs off the tile sizes,
# more channels and outputs than one tile (70 > 64), one-pixel-wide images (every tap but the centre outside).
SHAPES = [(2, 5, 4, 3, 1, 32), (2, 6, 6, 2, 3, 5), (1, 4, 3, 2, 70, 66), (3, 1, 1, 2, 4, 8)]


@pytest.mark.parametrize("shape", SHAPES)
def test_output_and_gradients_equal_the_gemm_paths_in_float64(shape, fused):
    args = random_args(*shape)
    grad = torch.randn(*shape[:4], shape[5], dtype=torch.float64)
    got = fused.FusedStackedConvFunction.apply(*args)
    want = StackedConvFunction.apply(*args)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    for g, w in zip(torch.autograd.grad(got, args, grad), torch.autograd.grad(want, args, grad)):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_gradients_match_finite_differences(fused):
    assert torch.autograd.gradcheck(fused.FusedStackedConvFunction.apply, random_args(2, 3, 4, 2, 2, 3), fast_mode=True)


def test_weight_gradient_is_the_same_whatever_the_pixel_sum_is_cut_into(fused, monkeypatch):
    x, _, _ = random_args(2, 7, 5, 2, 3, 4)
    grad_y = torch.randn(2, 7, 5, 2, 4, dtype=torch.float64)
    whole = fused.grad_weight(x, grad_y)
    monkeypatch.setattr(fused, "BLOCK_PIXELS", 16)  # 70 pixels: 5 blocks, cut into up to 5 chunks by 8 processors
    monkeypatch.setattr(fused, "_processors", lambda _: 8)
    assert fused.weight_split(9 * 2, 5, 8) == 2
    torch.testing.assert_close(fused.grad_weight(x, grad_y), whole, rtol=1e-12, atol=1e-12)


def test_weight_split_gives_each_processor_four_programs_and_a_chunk_at_least_a_block(fused):
    assert fused.weight_split(programs=64, pixel_blocks=400, processors=132) == 9  # ceil(528 / 64)
    assert fused.weight_split(programs=600, pixel_blocks=400, processors=132) == 1  # already enough programs
    assert fused.weight_split(programs=1, pixel_blocks=3, processors=132) == 3  # no more chunks than pixel blocks


def test_layer_is_each_members_conv2d_under_autocast_too(fused):
    # float16, not bfloat16: the interpreter computes in numpy, which has no bfloat16 (tests/test_gpu.py checks it on a card)
    torch.manual_seed(0)
    convs = [nn.Conv2d(2, 4, 3, padding=1) for _ in range(3)]
    layer = stack_layer(convs, "fused")
    assert layer.function is fused.FusedStackedConvFunction
    x = torch.randn(2, 6, 5, 4).contiguous(memory_format=torch.channels_last)
    want = torch.cat([conv(x[:, 2 * k:2 * k + 2]) for k, conv in enumerate(convs)], 1)
    torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    with torch.autocast("cpu", dtype=torch.float16):
        low = layer(x)
    assert low.dtype == torch.float16
    torch.testing.assert_close(low.float(), want, rtol=1e-2, atol=1e-2)
