"""Registers, spills and shared memory of cookbook.fused_conv's kernels, compiled for a GPU that need not be here.

    python -m benchmarks.kernel_build --arch 90      # an H100; no GPU needed: Triton's compiler and its bundled ptxas

One row per kernel, precision and layer of the default model (conv 1->32, 32->64, 64->128). Spilled registers
go through local memory on every use: a kernel that spills has a tile or an unrolled loop too large. Triton's
compiler entry points (triton.compile, ASTSource, GPUTarget) are used only here.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

LAYERS = ((1, 32), (32, 64), (64, 128))  # (input channels, outputs) of the default StableNet's convs
PRECISIONS = {"bf16": ("bf16", "fp32", "tf32"), "fp32": ("fp32", "fp32", "tf32"), "fp64": ("fp64", "fp64", "ieee")}


def kernels(fc, tl, channels: int, out: int, precision: str) -> list[tuple]:
    """(kernel, pointer arguments' types, int arguments, constexprs, warps) of one layer's three kernels, as launched."""
    data, acc, prec = PRECISIONS[precision]
    rows = []
    for name, launch in fc.configs(channels, out).items():
        fn, launch = getattr(fc, name), dict(launch)
        warps = launch.pop("num_warps")
        constexprs = {"C": channels, "OUT": out, "ACC": getattr(tl, {"fp32": "float32", "fp64": "float64"}[acc]), "PREC": prec,
                      **launch}
        names = fn.arg_names[:fn.arg_names.index("M")]  # the tensors; partial sums are in the accumulator's type
        pointers = {n: f"*{acc}" if n == "partial" else f"*{data}" for n in names}
        ints = [n for n in fn.arg_names if n not in pointers and n not in constexprs]
        rows.append((fn, pointers, ints, constexprs, warps))
    return rows


def build(triton, fn, pointers: dict, ints: list, constexprs: dict, warps: int, arch: int, scratch: Path) -> dict:
    """Compile one kernel for sm_<arch> and read ptxas's register report."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    signature = {**pointers, **{name: "i32" for name in ints}, **{name: "constexpr" for name in constexprs}}
    source = ASTSource(fn, signature, constexprs={(fn.arg_names.index(n),): v for n, v in constexprs.items()})
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps})
    ptx = scratch / "kernel.ptx"
    ptx.write_text(compiled.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    report = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(scratch / "kernel.cubin")],
                            capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, report).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores_bytes": number(r"(\d+) bytes spill stores"),
            "shared_bytes": compiled.metadata.shared, "warps": compiled.metadata.num_warps}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_build", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 = H100, 80 = A100")
    parser.add_argument("--precisions", default="bf16,fp32")
    args = parser.parse_args(argv)
    precisions = args.precisions.split(",")
    if bad := [p for p in precisions if p not in PRECISIONS]:
        print(f"error: --precisions {bad[0]!r} is not valid; choose from: {', '.join(PRECISIONS)}", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, before triton is imported
    import triton
    import triton.language as tl

    from cookbook import fused_conv
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for precision in precisions:
            for channels, out in LAYERS:
                for fn, pointers, ints, constexprs, warps in kernels(fused_conv, tl, channels, out, precision):
                    row = build(triton, fn, pointers, ints, constexprs, warps, args.arch, Path(scratch))
                    rows.append({"kernel": fn.__name__.lstrip("_"), "precision": precision, "layer": f"{channels}->{out}", **row})
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"\ntriton {triton.__version__}, sm_{args.arch}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
