"""Milliseconds of each fused-conv kernel (forward, input and weight gradient) under training's tiling and others.

    python -m benchmarks.fused_tiles --members 64 --precision bf16                  # on a CUDA GPU
    python -m benchmarks.fused_tiles --vary block_pixels=32,128 --vary stages=4      # only these tilings

For each conv of the default model (K stacked members at batch 128) each kernel training runs (the first layer
has no input gradient) is timed under cookbook.fused_conv's default Tiling and under tilings that change one
field of it. Columns: median ms of --repeats calls, speed-up over the default (above 1: faster than training's),
TFLOP/s of the convolution's multiply-adds, GB/s counting each tensor read or written once (the least traffic
the kernel can have), and the largest difference from the default tiling's result relative to its largest value
(tilings cut sums differently, so a few ulps are expected; more means a broken tiling).
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import pandas as pd
import torch

from benchmarks import usage_error
from benchmarks.kernel_speed import conv_layers, timed_ms, write_table

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
VARY = {"block_pixels": (32, 128), "stages": (2, 4), "programs_per_sm": (1, 16), "max_warps": (4,)}
WEIGHT_ONLY = {"programs_per_sm"}  # fields only the weight gradient reads


def parse_vary(items: list[str] | None) -> dict[str, tuple[int, ...]]:
    """--vary FIELD=V1,V2 options as {field: values}; all of VARY without any."""
    if not items:
        return VARY
    vary = {}
    for item in items:
        field, _, values = item.partition("=")
        if field not in VARY:
            raise ValueError(f"--vary {item!r}: no tiling field {field!r}; choose from: {', '.join(VARY)}")
        try:
            vary[field] = tuple(int(v) for v in values.split(","))
        except ValueError:
            raise ValueError(f"--vary {item!r}: values must be integers, like {field}=32,128") from None
    return vary


def layer_tensors(batch: int, side: int, members: int, c: int, out: int, dtype, device) -> dict[str, torch.Tensor]:
    """Random activations, weights and output gradient of one stacked conv, in the kernels' layouts."""
    shape = (batch, side, side, members)
    return {"x": torch.randn(*shape, c, dtype=dtype, device=device),
            "weight": torch.randn(members, 9 * c, out, dtype=dtype, device=device) / (3 * c ** 0.5),
            "bias": torch.randn(members, out, dtype=dtype, device=device), "grad_y": torch.randn(*shape, out, dtype=dtype, device=device)}


def kernel_calls(fc, t: dict[str, torch.Tensor]) -> dict[str, tuple]:
    """kernel name -> (call taking a tiling, bytes read and written at least once) for the kernels training runs on t."""
    size = lambda *names: sum(t[n].numel() * t[n].element_size() for n in names)  # noqa: E731
    calls = {"forward": (lambda tiling: fc.forward(t["x"], t["weight"], t["bias"], tiling), size("x", "weight", "bias", "grad_y")),
             "grad_weight": (lambda tiling: fc.grad_weight(t["x"], t["grad_y"], tiling), size("x", "grad_y", "weight"))}
    if t["x"].shape[-1] > 1:  # the images need no gradient
        calls["grad_input"] = (lambda tiling: fc.grad_input(t["grad_y"], t["weight"], tiling), size("grad_y", "weight", "x"))
    return calls


def tilings(fc, vary: dict[str, tuple[int, ...]], kernel: str) -> list[tuple[str, object]]:
    """("default", training's Tiling) and one tiling per value in vary that differs from it and matters to kernel."""
    default = fc.TILING
    others = [(f"{field}={value}", dataclasses.replace(default, **{field: value})) for field, values in vary.items()
              for value in values if value != getattr(default, field) and (kernel == "grad_weight" or field not in WEIGHT_ONLY)]
    return [("default", default), *others]


def rows_for(fc, device, members: int, batch: int, dtype, vary: dict, repeats: int) -> list[dict]:
    """One row per (layer, kernel, tiling), printed as it is measured (a stopped run keeps what it printed)."""
    rows = []
    for c, out, side in conv_layers():
        t = layer_tensors(batch, side, members, c, out, dtype, device)
        flops = 2 * batch * side * side * members * 9 * c * out
        for kernel, (call, traffic) in kernel_calls(fc, t).items():
            reference = None
            for name, tiling in tilings(fc, vary, kernel):
                result = call(tiling).float()
                reference = result if reference is None else reference
                ms = timed_ms(lambda: call(tiling), device, repeats)  # noqa: B023 (called here, in this iteration)
                difference = ((result - reference).abs().max() / reference.abs().max()).item()
                rows.append({"layer": f"{c}->{out} @{side}", "kernel": kernel, "tiling": name, "ms": ms,
                             "TFLOP/s": flops / ms / 1e9, "GB/s": traffic / ms / 1e6, "rel_diff": difference})
                print("\t".join(f"{v:.3g}" if isinstance(v, float) else v for v in rows[-1].values()), flush=True)
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments, --vary as {field: values}; a bad one exits 2 in one line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.fused_tiles", description=__doc__.split("\n\n")[0])
    parser.add_argument("--members", type=int, default=64, help="K, stacked members")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16", choices=list(DTYPES))
    parser.add_argument("--vary", action="append", metavar="FIELD=V1,V2", help=f"tilings to time (default: {VARY})")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", default="benchmarks/results")
    args = parser.parse_args(argv)
    try:
        args.vary = parse_vary(args.vary)
    except ValueError as error:
        usage_error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    if not (torch.cuda.is_available() or interpreted):
        print("error: the fused kernels need a CUDA GPU (or Triton's interpreter: TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    from cookbook import fused_conv  # Triton reads TRITON_INTERPRET when it is first imported
    device = torch.device("cpu" if interpreted else "cuda")
    table = pd.DataFrame(rows_for(fused_conv, device, args.members, args.batch, DTYPES[args.precision], args.vary, args.repeats))
    table.insert(4, "speed-up", table.groupby(["layer", "kernel"])["ms"].transform("first") / table["ms"])
    stem = Path(args.out) / f"fused_tiles-{device.type}-{args.precision}-k{args.members}"
    write_table(table, stem)
    return 0


if __name__ == "__main__":
    sys.exit(main())
