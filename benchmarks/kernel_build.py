"""Registers, spills and shared memory of cookbook.fused_conv's and fused_norm's kernels as training launches them, for a GPU
that need not be here.

    python -m benchmarks.kernel_build --arch 90                         # an H100; no GPU needed
    python -m benchmarks.kernel_build --vary block_pixels=32,128        # other tilings (as in benchmarks.fused_tiles)

fused_conv's and fused_norm's own host functions run on meta tensors of the default model's layers (K members at batch 128), with
each kernel swapped for a recorder; every recorded launch is compiled as Triton's JIT would compile it (its
specialisation of the arguments: 16-byte-aligned pointers, integers divisible by 16 or equal to 1, which decides
whether loads are vectorised and pipelined) for sm_<arch>, and Triton's bundled ptxas reports registers and spills.
A kernel that spills goes through local memory on every use: its tile or an unrolled loop is too large.
Triton's compiler internals (triton.compile, ASTSource, make_backend, the JIT's binder and _pack_args, pinned
with torch) are used only here.
"""
from __future__ import annotations

import argparse
import functools
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pandas as pd

from benchmarks import usage_error

KERNELS = ("_forward", "_grad_input", "_grad_weight")


def recorded_launches(module, kernels: tuple[str, ...], call, processors: int) -> list[tuple]:
    """(kernel, args, kwargs) of each launch call() makes on a card of `processors` multiprocessors (the sums' splits
    depend on them), recorded instead of run; module is left as it was."""
    launches, originals = [], {name: getattr(module, name) for name in (*kernels, "_processors") if hasattr(module, name)}

    class Recorder:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            return lambda *args, **kwargs: launches.append((self.kernel, args, kwargs))
    try:
        for name in kernels:
            setattr(module, name, Recorder(originals[name]))
        if "_processors" in originals:
            module._processors = lambda _: processors
        call()
    finally:
        for name, kernel in originals.items():
            setattr(module, name, kernel)
    return launches


def recorded_launch(fc, call, tiling, processors: int) -> tuple:
    """The one launch of fused_conv's kernels that call(tiling) makes."""
    (launch,) = recorded_launches(fc, KERNELS, lambda: call(tiling), processors)
    return launch


def compiled(triton, kernel, args: tuple, kwargs: dict, arch: int):
    """kernel compiled for sm_<arch> with what JITFunction.run would derive from these arguments (no device needed)."""
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    return triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)


def report(triton, binary, arch: int, scratch: Path) -> dict:
    """ptxas's registers and spills for a compiled kernel, with its shared memory, warps, stages and cp.async copies
    (the loads Triton pipelines through shared memory; none means every load is waited for)."""
    ptx = scratch / "kernel.ptx"
    ptx.write_text(binary.asm["ptx"])
    ptxas = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas"
    out = subprocess.run([str(ptxas), f"-arch=sm_{arch}a", "-v", str(ptx), "-o", str(scratch / "kernel.cubin")],
                         capture_output=True, text=True, check=True).stderr
    number = lambda pattern: int(re.search(pattern, out).group(1))  # noqa: E731
    return {"registers": number(r"Used (\d+) registers"), "spill_stores_bytes": number(r"(\d+) bytes spill stores"),
            "shared_bytes": binary.metadata.shared, "warps": binary.metadata.num_warps,
            "stages": binary.metadata.num_stages, "async_copies": len(re.findall(r"cp\.async\.c[ag]", ptx.read_text()))}


def rows_for(triton, fc, args: argparse.Namespace) -> list[dict]:
    """One row per (precision, layer, kernel training runs, tiling) of parse's arguments."""
    import torch

    from benchmarks.fused_tiles import DTYPES, kernel_calls, layer_tensors, tilings
    from benchmarks.kernel_speed import conv_layers
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for precision in args.precisions:
            for c, out, side in conv_layers():
                tensors = layer_tensors(args.batch, side, args.members, c, out, DTYPES[precision], torch.device("meta"))
                for kernel, (call, _) in kernel_calls(fc, tensors).items():
                    for name, tiling in tilings(fc, args.vary, kernel):
                        binary = compiled(triton, *recorded_launch(fc, call, tiling, args.sms), args.arch)
                        rows.append({"kernel": kernel, "precision": precision, "layer": f"{c}->{out}", "tiling": name,
                                     **report(triton, binary, args.arch, Path(scratch))})
    return rows


NORM_KERNELS = ("_stats", "_forward", "_grad_sums", "_grad_input")


def norm_step(fn, x, table, pool: int) -> None:
    """What one training step launches of cookbook.fused_norm for a block's map x ([B, C] tables: any values)."""
    fn.image_stats(x)
    pooled = fn.pool_forward(x, table, table, pool)
    fn.grad_sums(x, *[table] * 4, pooled, pool)
    fn.grad_input(x, *[table] * 6, pooled, pool)


def norm_rows(triton, fn, args: argparse.Namespace) -> list[dict]:
    """One row per (precision, conv block, kernel) of cookbook.fused_norm's launches in one training step."""
    import torch

    from benchmarks.fused_tiles import DTYPES
    from benchmarks.kernel_speed import SIDE, conv_layers
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for precision in args.precisions:
            for _, out, side in conv_layers():
                pool = 2 if side > SIDE[-1] else 1  # the last block has no pool
                x = torch.empty(args.batch, side, side, args.members * out, dtype=DTYPES[precision], device="meta")
                step = functools.partial(norm_step, fn, x, torch.empty(args.batch, args.members * out, device="meta"), pool)
                for kernel, launch_args, kwargs in recorded_launches(fn, NORM_KERNELS, step, args.sms):
                    binary = compiled(triton, kernel, launch_args, kwargs, args.arch)
                    rows.append({"kernel": f"norm{kernel.fn.__name__}", "precision": precision, "layer": f"{out}@{side}",
                                 "tiling": "default", **report(triton, binary, args.arch, Path(scratch))})
    return rows


def parse(argv: list[str] | None) -> argparse.Namespace:
    """The command line's arguments, --precisions as a list and --vary as {field: values}; bad ones exit 2 in one line."""
    from benchmarks.fused_tiles import DTYPES, parse_vary
    parser = argparse.ArgumentParser(prog="python -m benchmarks.kernel_build", description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability x 10: 90 = H100, 80 = A100")
    parser.add_argument("--sms", type=int, default=132, help="the card's multiprocessors (132: H100 SXM)")
    parser.add_argument("--precisions", default="bf16,fp32")
    parser.add_argument("--members", type=int, default=64, help="K, stacked members")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--vary", action="append", metavar="FIELD=V1,V2", help="tilings besides the default")
    args = parser.parse_args(argv)
    args.precisions = args.precisions.split(",")
    try:
        if bad := [p for p in args.precisions if p not in DTYPES]:
            raise ValueError(f"--precisions {bad[0]!r} is not valid; choose from: {', '.join(DTYPES)}")
        args.vary = parse_vary(args.vary) if args.vary else {}
    except ValueError as error:
        usage_error(str(error))
    return args


def main(argv: list[str] | None = None) -> int:
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU: before anything imports triton (torchvision does)
    args = parse(argv)
    import triton

    from cookbook import fused_conv, fused_norm
    rows = rows_for(triton, fused_conv, args) + norm_rows(triton, fused_norm, args)
    print(pd.DataFrame(rows).to_string(index=False))
    print(f"\ntriton {triton.__version__}, sm_{args.arch}, {args.sms} multiprocessors, K={args.members}, batch {args.batch}")
    return 0

if __name__ == "__main__":
    sys.exit(main())
