"""Forward + backward milliseconds of the layers we pick between: stacked conv (grouped, NCHW, gemm, fused), stacked
BatchNorm+pool+ReLU (PyTorch's ops vs fused), LayerNorm (NHWC vs NCHW).

    python -m benchmarks.kernel_speed --device cuda --members 64 --precision bf16
    python -m benchmarks.kernel_speed --fastest benchmarks/results/kernel_speed-cuda-bf16-k64.csv   # -> fused+fused+fused

Shapes are the default StableNet's at batch 128: conv 1->32 at 28x28, 32->64 at 14x14, 64->128 at 7x7
(stacked: K members each), norms after each conv; fused (cookbook.fused_conv, Triton) on CUDA only.
Channels-last inputs (training's default) unless the variant says nchw. Each row is the median of --repeats
timed calls after warm-up; the ratio column is the first variant's time over each.
Eager calls: layers that take well under a millisecond (the norms) measure launches as much as kernels.
Kernels run under training's default settings (deterministic on CUDA), so the fastest kind it names is the one training gets.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from benchmarks.train_speed import machine
from cookbook.config import BLOCK_CONVS
from cookbook.determinism import configure
from cookbook.model import block_channels
from cookbook.stacked import stack_layer

SIDE = (28, 14, 7)  # each conv block's input side in the default model
NHWC, NCHW = torch.channels_last, torch.contiguous_format


def timed_ms(fn, device: torch.device, repeats: int) -> float:
    """Median milliseconds of fn() over repeats (after 3 warm-up calls), waiting for the device each time."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for _ in range(3):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        started = time.perf_counter()
        fn()
        sync()
        times.append(1000 * (time.perf_counter() - started))
    return statistics.median(times)


def forward_backward(module: nn.Module, x: torch.Tensor, precision, input_grad: bool = True):
    """One forward and backward through module from a fresh leaf copy of x (the input's gradient too, unless it is the images)."""
    def call():
        leaf = x.detach().requires_grad_(input_grad)
        with precision:
            out = module(leaf)
        out.float().sum().backward()
    return call


def conv_variants(device: torch.device) -> list[tuple[str, str, torch.memory_format]]:
    """(name, compute.stacked_conv, layout) of each stacked conv timed; Triton's kernels need a GPU."""
    variants = [("grouped", "grouped", NHWC), ("grouped-nchw", "grouped", NCHW), ("gemm", "gemm", NHWC)]
    return variants + [("fused", "fused", NHWC)] if device.type == "cuda" else variants


def conv_layers() -> list[tuple[int, int, int]]:
    """(input channels, outputs, input side) of each conv of the default model."""
    outputs = block_channels(1.0, 3)
    return list(zip([1, *outputs[:-1]], outputs, SIDE))


def batchnorm_rows(device, members: int, batch: int, channels: int, side: int, precision, repeats: int,
                   dtype: torch.dtype) -> list[dict]:
    """A stacked block's BatchNorm, 2x2 max-pool (not after the last conv) and ReLU: PyTorch's three ops, and on CUDA
    cookbook.fused_norm's kernels; on the conv's output, in dtype (bf16 where autocast makes the conv's output bf16)."""
    pool = side > SIDE[-1]
    block = [nn.BatchNorm2d(members * channels), *([nn.MaxPool2d(2)] if pool else []), nn.ReLU(inplace=True)]
    variants = [("torch", nn.Sequential(*block))]
    if device.type == "cuda":
        from cookbook.fused_norm import FusedNormSequential
        variants.append(("fused", FusedNormSequential(block)))
    x = torch.randn(batch, members * channels, side, side, device=device, dtype=dtype).contiguous(memory_format=NHWC)
    name = f"BatchNorm{'+pool' if pool else ''}+ReLU {channels} @{side} x K={members}"
    return [{"layer": name, "variant": variant, "ms": timed_ms(forward_backward(layer.to(device), x, precision), device, repeats)}
            for variant, layer in variants]


def rows_for(device, members: int, batch: int, precision, repeats: int, dtype: torch.dtype = torch.float32) -> pd.DataFrame:
    """One row per (layer, variant): median fwd+bwd ms, and the ratio to the layer's first variant."""
    rows = []
    for c_in, c_out, side in conv_layers():
        x = torch.randn(batch, members * c_in, side, side, device=device)
        convs = [nn.Conv2d(c_in, c_out, 3, padding=1) for _ in range(members)]
        for variant, kind, layout in conv_variants(device):
            layer = stack_layer(convs, kind).to(device, memory_format=layout)
            ms = timed_ms(forward_backward(layer, x.contiguous(memory_format=layout), precision, c_in > 1), device, repeats)
            rows.append({"layer": f"conv {c_in}->{c_out} @{side} x K={members}", "variant": variant, "ms": ms})
        rows += batchnorm_rows(device, members, batch, c_out, side, precision, repeats, dtype)
        y = torch.randn(batch, c_out, side, side, device=device)
        norm = nn.GroupNorm(1, c_out).to(device)  # the model's LayerNorm
        for variant, layout in (("group_norm", NHWC), ("group_norm-nchw", NCHW)):
            ms = timed_ms(forward_backward(norm, y.contiguous(memory_format=layout), precision), device, repeats)
            rows.append({"layer": f"LayerNorm {c_out} @{side}", "variant": variant, "ms": ms})
    table = pd.DataFrame(rows)
    table["ratio"] = table.groupby("layer")["ms"].transform("first") / table["ms"]
    return table


def write_table(table: pd.DataFrame, stem: Path) -> None:
    """Write table to STEM.csv and print it (3 significant digits) with the machine it was measured on."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(f"{stem}.csv", index=False)
    print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    print(f"\nmachine: {machine()}\nwritten: {stem}.csv")


def fastest_blocks(table: pd.DataFrame) -> str:
    """The compute.stacked_conv that takes each conv block's fastest kind in table (channels-last ones: the layout is
    the whole model's), blocks in the table's order, e.g. 'gemm+grouped+fused'."""
    convs = table[table["layer"].str.startswith("conv") & table["variant"].isin(BLOCK_CONVS)]
    if convs.empty:
        raise ValueError("no stacked conv rows")
    fastest = convs.loc[convs.groupby("layer", sort=False)["ms"].idxmin()]
    return "+".join(fastest["variant"])


def table_stem(args: argparse.Namespace) -> Path:
    """Where main writes the table of parse's arguments (without .csv)."""
    return Path(args.out) / f"kernel_speed-{args.device}-{args.precision}-k{args.members}"


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_speed", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fastest", metavar="CSV", help="print the compute.stacked_conv of a written table's fastest kinds")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    parser.add_argument("--members", type=int, default=64, help="K, stacked members")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=["fp32", "bf16"])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    if args.fastest:
        try:
            print(fastest_blocks(pd.read_csv(args.fastest)))
        except (OSError, KeyError, ValueError) as error:  # no file, not CSV, no conv rows, not this benchmark's columns
            print(f"error: --fastest {args.fastest!r} is not a kernel_speed table ({error!r:.80})", file=sys.stderr)
            return 2
        return 0
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda but no CUDA GPU is visible; choose --device cpu", file=sys.stderr)
        return 2
    device = torch.device(args.device)
    configure(True, device)  # the kernels training runs with by default (deterministic): the table picks its kinds
    precision = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.precision == "bf16")
    dtype = torch.bfloat16 if args.precision == "bf16" else torch.float32
    table = rows_for(device, args.members, args.batch, precision, args.repeats, dtype)
    write_table(table, table_stem(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
