"""The Triton stacked convolution, run by Triton's CPU interpreter: the gemm path's sums, forward and backward."""
import dataclasses
import os
import subprocess
import sys

import pandas as pd
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


def test_every_kernel_compiles_for_an_h100_as_launched_without_spills_and_with_pipelined_loads():
    done = subprocess.run([sys.executable, "-m", "benchmarks.kernel_build", "--arch", "90"], cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.split("\n\n")[0].splitlines()
    every = pd.DataFrame([line.split() for line in lines[1:]], columns=lines[0].split())
    assert (every["spill_stores_bytes"] == "0").all(), done.stdout
    # cookbook.fused_norm's: bf16 and fp32 x 3 blocks x (statistics, forward, the gradient's sums, input gradient)
    assert every["kernel"].str.startswith("norm_").sum() == 24
    table = every[~every["kernel"].str.startswith("norm_")]
    # bf16 and fp32 x (forward, weight gradient) x 3 layers + input gradients of the two layers that need one
    assert len(table) == 16 and set(table[table["layer"] == "1->32"]["kernel"]) == {"forward", "grad_weight"}
    # loads pipelined through cp.async (bf16 only where Triton knows them aligned, as the JIT specialises real launches),
    # except in the first layer's forward, whose loop is one block (its 9 taps x 1 channel): nothing to overlap
    single = (table["layer"] == "1->32") & (table["kernel"] == "forward")
    assert (table[~single]["async_copies"].astype(int) > 0).all() and (table[single]["async_copies"] == "0").all(), done.stdout


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
    whole = fused.grad_weight(x, grad_y)  # 70 pixels in 2 blocks of 64, cut in 2 on 2 interpreter "processors"
    monkeypatch.setattr(fused, "_processors", lambda _: 1)
    splits, split = [], fused.weight_split
    monkeypatch.setattr(fused, "weight_split", lambda *args: splits.append(split(*args)) or splits[-1])
    for per_processor in (1, 4, 16):  # 5 blocks of 16 pixels, 2 programs a chunk (2 members): 1, 2 and (at most) 5
        tiling = fused.Tiling(block_pixels=16, programs_per_sm=per_processor)
        torch.testing.assert_close(fused.grad_weight(x, grad_y, tiling), whole, rtol=1e-12, atol=1e-12)
    assert splits == [1, 2, 5]


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


def test_fused_tiles_runs_every_kernel_training_runs_under_each_tiling_and_compares_results(fused, tmp_path, monkeypatch):
    from benchmarks import fused_tiles
    assert set(fused_tiles.VARY) == {field.name for field in dataclasses.fields(fused.Tiling)}  # every field can vary
    monkeypatch.setattr(fused_tiles, "timed_ms", lambda fn, device, repeats: (fn(), 1.0)[1])  # interpreted: no timing
    vary = ["--vary", "block_pixels=32", "--vary", "programs_per_sm=4,16"]  # 4 is the default's: not timed twice
    assert fused_tiles.main(["--members", "1", "--batch", "1", "--precision", "fp32", *vary, "--out", str(tmp_path)]) == 0
    table = pd.read_csv(tmp_path / "fused_tiles-cpu-fp32-k1.csv")
    tilings = table.groupby("kernel")["tiling"].unique().map(sorted).to_dict()
    assert tilings == {"forward": ["block_pixels=32", "default"], "grad_input": ["block_pixels=32", "default"],
                       "grad_weight": ["block_pixels=32", "default", "programs_per_sm=16"]}
    assert set(table[table["layer"] == "1->32 @28"]["kernel"]) == {"forward", "grad_weight"}  # the images need no gradient
    assert len(table) == 3 * 2 + 2 * 2 + 3 * 3 and (table["speed-up"] == 1).all()
    assert (table["rel_diff"] < 1e-5).all() and (table[table["tiling"] == "default"]["rel_diff"] == 0).all()


@pytest.mark.parametrize("vary, named", [("tiles=32", "no tiling field 'tiles'; choose from: block_pixels, stages"),
                                         ("stages=two", "values must be integers")])
def test_fused_tiles_refuses_a_bad_tiling_in_one_line(vary, named, capsys):
    from benchmarks import fused_tiles
    with pytest.raises(SystemExit) as exited:
        fused_tiles.main(["--vary", vary])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert named in err and err.count("\n") == 1
