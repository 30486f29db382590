"""K members' 3x3 convolutions as implicit GEMMs in Triton: cookbook.stacked_conv's sums without writing im2col.

Same layouts as cookbook.stacked_conv: x [B, H, W, K, C] in memory, weight [K, 9C, OUT] (row t*C + c is tap t =
3*dy + dx, channel c), output [B, H, W, K, OUT]. Each program computes a tile of one member's product and reads
the 3x3 neighbourhood straight from x (masked at the border), so the 9x im2col copy that made the gemm path lose
on 32-64 channel layers never exists. Three kernels: forward, input gradient (the same sums with the taps
mirrored) and weight gradient (a reduction over pixels, split into a fixed number of chunks whose partial sums
torch adds in a fixed order). No atomics and fixed tile sizes (no autotuning): deterministic on one card.
Off CUDA the kernels run only under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

MIN_SIDE, MAX_SIDE = 16, 64  # tl.dot needs every tile side >= 16


@dataclass(frozen=True)
class Tiling:
    """How the work is cut into programs (what training launches by default; python -m benchmarks.fused_tiles times others).

    A tiling fixes the order of every sum, so one tiling is deterministic; two may differ in the last bits (the weight
    gradient's pixel chunks follow block_pixels and programs_per_sm)."""
    block_pixels: int = 64  # pixels per program (the GEMMs' M)
    stages: int = 3  # Triton's software-pipelining depth of the loops over blocks of (tap, channel) rows
    programs_per_sm: int = 4  # the weight gradient's pixel sum is cut until there are this many programs a multiprocessor
    max_warps: int = 8  # warps() gives 4, or this many once a tile reaches 64x64


TILING = Tiling()


def tile(n: int) -> int:
    """A tile side for a dimension of n: a power of two in [MIN_SIDE, MAX_SIDE], no larger than needed."""
    return min(MAX_SIDE, max(MIN_SIDE, triton.next_power_of_2(n)))


def rows_tile(c: int) -> int:
    """Rows of a 9c-row (tap, channel) sum a block takes: whole taps when a tile divides c, else consecutive rows
    across taps (one input channel: the 9 taps in one block of 16 instead of 9 blocks of 16 with 15 rows of zeros)."""
    return tile(c) if c % tile(c) == 0 else tile(9 * c)


def warps(m: int, n: int, k: int, most: int = TILING.max_warps) -> int:
    """Warps per program whose tl.dot is [m, k] x [k, n]: `most` once a tile reaches 64x64, else 4. (As launched,
    none of the kernels spills with 4 warps either: benchmarks.kernel_build --vary max_warps=4; benchmarks.fused_tiles
    times both.)"""
    return most if max(m * n, m * k, k * n) >= 64 * 64 else 4


def configs(c: int, out: int, tiling: Tiling = TILING) -> dict[str, dict]:
    """Each kernel's tile sizes, warps and pipelining stages for a layer of c input channels and out outputs, as launched."""
    rc, ro, tc, to, bm, most = rows_tile(c), rows_tile(out), tile(c), tile(out), tiling.block_pixels, tiling.max_warps
    launch = {"num_stages": tiling.stages}
    return {"_forward": {"BM": bm, "BR": rc, "BN": to, "num_warps": warps(bm, to, rc, most), **launch},
            "_grad_input": {"BM": bm, "BR": ro, "BN": tc, "num_warps": warps(bm, tc, ro, most), **launch},
            "_grad_weight": {"BM": bm, "BR": rc, "BN": to, "num_warps": warps(rc, to, bm, most), **launch}}


def weight_split(programs: int, pixel_blocks: int, processors: int, per_processor: int = TILING.programs_per_sm) -> int:
    """Chunks the weight gradient's pixel sum is cut into: enough for per_processor programs each, at most one per block."""
    return max(1, min(pixel_blocks, -(-per_processor * processors // programs)))


@triton.jit
def _pixels(M, H, W, BM: tl.constexpr):
    """This program's BM flat pixel indices (b*H*W + h*W + w; int32, < M), with their rows and columns."""
    m = tl.program_id(0) * BM + tl.arange(0, BM)
    return m, (m // W) % H, m % W


@triton.jit
def _neighbour(m, h, w, M, H, W, dy, dx):
    """Pixel m's neighbour at (dy, dx) as a 64-bit flat index, and whether it exists (inside the image, m < M)."""
    inside = (m < M) & (h + dy >= 0) & (h + dy < H) & (w + dx >= 0) & (w + dx < W)
    return (m + dy * W + dx).to(tl.int64), inside


@triton.jit
def _rows(block, C: tl.constexpr, BR: tl.constexpr):
    """Block `block` of the rows r = t*C + c of a sum over taps t and channels c: r, t and c. The tap is a scalar where
    the block lies in one tap (BR divides C), else a [1, BR] row (the first layer: 9 taps of one channel a block)."""
    r = block * BR + tl.arange(0, BR)
    if C % BR == 0:
        t = block * BR // C
    else:
        t = (r // C)[None, :]
    return r, t, r % C


@triton.jit
def _forward(x, weight, bias, y, M, H, W, K, C: tl.constexpr, OUT: tl.constexpr,
             BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    m, h, w = _pixels(M, H, W, BM)
    k, n = tl.program_id(2), tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), ACC)
    for block in range((9 * C + BR - 1) // BR):  # a runtime loop, not unrolled: Triton pipelines its loads
        r, t, c = _rows(block, C, BR)
        src, inside = _neighbour(m[:, None], h[:, None], w[:, None], M, H, W, t // 3 - 1, t % 3 - 1)
        a = tl.load(x + (src * K + k) * C + c[None, :], mask=inside & (r[None, :] < 9 * C), other=0.0)
        b = tl.load(weight + (k * 9 * C + r)[:, None] * OUT + n[None, :],
                    mask=(r[:, None] < 9 * C) & (n[None, :] < OUT), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    acc += tl.load(bias + k * OUT + n, mask=n < OUT, other=0.0).to(ACC)[None, :]
    out = y + ((m.to(tl.int64) * K + k) * OUT)[:, None] + n[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < OUT))


@triton.jit
def _grad_input(grad_y, weight, grad_x, M, H, W, K, C: tl.constexpr, OUT: tl.constexpr,
                BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    m, h, w = _pixels(M, H, W, BM)
    k, c = tl.program_id(2), tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), ACC)
    for block in range((9 * OUT + BR - 1) // BR):  # rows t*OUT + o; pixel m fed output pixel m - (dy, dx) via tap t
        r, t, o = _rows(block, OUT, BR)
        src, inside = _neighbour(m[:, None], h[:, None], w[:, None], M, H, W, 1 - t // 3, 1 - t % 3)
        a = tl.load(grad_y + (src * K + k) * OUT + o[None, :], mask=inside & (r[None, :] < 9 * OUT), other=0.0)
        b = tl.load(weight + (k * 9 * C + (r // OUT)[:, None] * C + c[None, :]) * OUT + o[:, None],
                    mask=(r[:, None] < 9 * OUT) & (c[None, :] < C), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    out = grad_x + ((m.to(tl.int64) * K + k) * C)[:, None] + c[None, :]
    tl.store(out, acc.to(grad_x.dtype.element_ty), mask=(m[:, None] < M) & (c[None, :] < C))


@triton.jit
def _grad_weight(x, grad_y, partial, M, H, W, CHUNK, K, C: tl.constexpr, OUT: tl.constexpr,
                 SPLIT, BM: tl.constexpr, BR: tl.constexpr, BN: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr):
    r, t, c = _rows(tl.program_id(0), C, BR)
    k, part = tl.program_id(2) // SPLIT, tl.program_id(2) % SPLIT
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BR, BN), ACC)
    for m0 in range(part * CHUNK, (part + 1) * CHUNK, BM):  # this program's chunk of the pixel sum, in order
        m = m0 + tl.arange(0, BM)
        src, inside = _neighbour(m[:, None], ((m // W) % H)[:, None], (m % W)[:, None], M, H, W, t // 3 - 1, t % 3 - 1)
        a = tl.load(x + (src * K + k) * C + c[None, :], mask=inside & (r[None, :] < 9 * C), other=0.0)
        b = tl.load(grad_y + ((m.to(tl.int64) * K + k) * OUT)[:, None] + n[None, :],
                    mask=(m[:, None] < M) & (n[None, :] < OUT), other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC, out_dtype=ACC)
    out = partial + ((part * K + k) * 9 * C + r)[:, None] * OUT + n[None, :]
    tl.store(out, acc, mask=(r[:, None] < 9 * C) & (n[None, :] < OUT))


def accumulator(x: torch.Tensor) -> torch.dtype:
    """The dtype sums over x are accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _precision(x: torch.Tensor) -> dict:
    """Accumulator dtype and tl.dot input precision: fp64 exact, fp32 TF32 where cuDNN's convs may use it, else fp32."""
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return {"ACC": tl.float64 if accumulator(x) == torch.float64 else tl.float32, "PREC": "tf32" if tf32 else "ieee"}


def _processors(x: torch.Tensor) -> int:
    """Streaming multiprocessors of x's GPU (2 under the interpreter, so that the tests cut the pixel sum)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, tiling: Tiling = TILING) -> torch.Tensor:
    """y[b, h, w, k] = sum over taps t and channels c of x at (h, w) + tap offset times weight[k, t*C + c] + bias[k]."""
    b, h, w, k, c = x.shape
    out = weight.shape[2]
    y = x.new_empty(b, h, w, k, out)
    launch = configs(c, out, tiling)["_forward"]
    grid = (triton.cdiv(b * h * w, launch["BM"]), triton.cdiv(out, launch["BN"]), k)
    _forward[grid](x, weight, bias, y, b * h * w, h, w, K=k, C=c, OUT=out, **launch, **_precision(x))
    return y


def grad_input(grad_y: torch.Tensor, weight: torch.Tensor, tiling: Tiling = TILING) -> torch.Tensor:
    """The input gradient: grad_y's shifted neighbourhoods times the weights (a convolution with mirrored taps)."""
    b, h, w, k, out = grad_y.shape
    c = weight.shape[1] // 9
    grad_x = grad_y.new_empty(b, h, w, k, c)
    launch = configs(c, out, tiling)["_grad_input"]
    grid = (triton.cdiv(b * h * w, launch["BM"]), triton.cdiv(c, launch["BN"]), k)
    _grad_input[grid](grad_y, weight, grad_x, b * h * w, h, w, K=k, C=c, OUT=out, **launch, **_precision(grad_y))
    return grad_x


def grad_weight(x: torch.Tensor, grad_y: torch.Tensor, tiling: Tiling = TILING) -> torch.Tensor:
    """The weight gradient [K, 9C, OUT] in the accumulator's dtype: per-chunk pixel sums, then added in chunk order."""
    b, h, w, k, c = x.shape
    out, pixels = grad_y.shape[4], b * h * w
    launch = configs(c, out, tiling)["_grad_weight"]
    blocks, rows = (triton.cdiv(9 * c, launch["BR"]), triton.cdiv(out, launch["BN"])), launch["BM"]
    split = weight_split(blocks[0] * blocks[1] * k, triton.cdiv(pixels, rows), _processors(x), tiling.programs_per_sm)
    chunk = triton.cdiv(triton.cdiv(pixels, split), rows) * rows
    partial = x.new_empty(split, k, 9 * c, out, dtype=accumulator(x))
    _grad_weight[(*blocks, k * split)](x, grad_y, partial, pixels, h, w, chunk, K=k, C=c, OUT=out, SPLIT=split,
                                       **launch, **_precision(x))
    return partial.sum(0)


class FusedStackedConvFunction(torch.autograd.Function):
    """cookbook.stacked_conv.StackedConvFunction's maths (same arguments and layouts) in three Triton kernels."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        x, weight = x.contiguous(), weight.contiguous()
        ctx.save_for_backward(x, weight)
        return forward(x, weight, bias.contiguous())

    @staticmethod
    def backward(ctx, grad_y):
        x, weight = ctx.saved_tensors
        grad_y = grad_y.contiguous()
        grad_x = grad_input(grad_y, weight) if ctx.needs_input_grad[0] else None
        grad_w = grad_weight(x, grad_y).to(weight.dtype)
        grad_b = grad_y.view(-1, *grad_y.shape[3:]).sum(0, dtype=accumulator(x))
        return grad_x, grad_w, grad_b.to(weight.dtype)
