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

import torch
import triton
import triton.language as tl

BLOCK_PIXELS = 64  # pixels per tile (the GEMMs' M); tl.dot needs every tile side >= 16
MIN_SIDE, MAX_SIDE = 16, 64


def tile(n: int) -> int:
    """A tile side for a dimension of n: a power of two in [MIN_SIDE, MAX_SIDE], no larger than needed."""
    return min(MAX_SIDE, max(MIN_SIDE, triton.next_power_of_2(n)))


def warps(m: int, n: int, k: int) -> int:
    """Warps per program whose tl.dot is [m, k] x [k, n]: 8 once a tile reaches 64x64 (with 4, ptxas needs ~250
    registers a thread there and spills in fp32: python -m benchmarks.kernel_build), else 4."""
    return 8 if max(m * n, m * k, k * n) >= 64 * 64 else 4


def configs(c: int, out: int) -> dict[str, dict]:
    """Each kernel's tile sizes and warps for a layer of c input channels and out outputs, as launched."""
    tc, to, bm = tile(c), tile(out), BLOCK_PIXELS
    return {"_forward": {"BM": bm, "BC": tc, "BN": to, "num_warps": warps(bm, to, tc)},
            "_grad_input": {"BM": bm, "BOUT": to, "BN": tc, "num_warps": warps(bm, tc, to)},
            "_grad_weight": {"BM": bm, "BC": tc, "BN": to, "num_warps": warps(tc, to, bm)}}


def weight_split(programs: int, pixel_blocks: int, processors: int) -> int:
    """Chunks the weight gradient's pixel sum is cut into: enough programs for 4 per processor, at most one per block."""
    return max(1, min(pixel_blocks, -(-4 * processors // programs)))


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
def _forward(x, weight, bias, y, M, H, W, K, C: tl.constexpr, OUT: tl.constexpr,
             BM: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    m, h, w = _pixels(M, H, W, BM)
    k, n = tl.program_id(2), tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), ACC)
    blocks_c: tl.constexpr = (C + BC - 1) // BC
    for step in range(9 * blocks_c):  # a runtime loop, not unrolled: Triton pipelines its loads, registers stay few
        t, c = step // blocks_c, (step % blocks_c) * BC + tl.arange(0, BC)
        src, inside = _neighbour(m, h, w, M, H, W, t // 3 - 1, t % 3 - 1)
        a = tl.load(x + ((src * K + k) * C)[:, None] + c[None, :], mask=inside[:, None] & (c[None, :] < C), other=0.0)
        b = tl.load(weight + (k * 9 * C + t * C + c)[:, None] * OUT + n[None, :],
                    mask=(c[:, None] < C) & (n[None, :] < OUT), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    acc += tl.load(bias + k * OUT + n, mask=n < OUT, other=0.0).to(ACC)[None, :]
    out = y + ((m.to(tl.int64) * K + k) * OUT)[:, None] + n[None, :]
    tl.store(out, acc.to(y.dtype.element_ty), mask=(m[:, None] < M) & (n[None, :] < OUT))


@triton.jit
def _grad_input(grad_y, weight, grad_x, M, H, W, K, C: tl.constexpr, OUT: tl.constexpr,
                BM: tl.constexpr, BOUT: tl.constexpr, BN: tl.constexpr, ACC: tl.constexpr, PREC: tl.constexpr):
    m, h, w = _pixels(M, H, W, BM)
    k, c = tl.program_id(2), tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BM, BN), ACC)
    blocks_out: tl.constexpr = (OUT + BOUT - 1) // BOUT
    for step in range(9 * blocks_out):  # pixel m fed output pixel m - (dy, dx) through tap t
        t, o = step // blocks_out, (step % blocks_out) * BOUT + tl.arange(0, BOUT)
        src, inside = _neighbour(m, h, w, M, H, W, 1 - t // 3, 1 - t % 3)
        a = tl.load(grad_y + ((src * K + k) * OUT)[:, None] + o[None, :], mask=inside[:, None] & (o[None, :] < OUT),
                    other=0.0)
        b = tl.load(weight + (k * 9 * C + t * C + c)[None, :] * OUT + o[:, None],
                    mask=(o[:, None] < OUT) & (c[None, :] < C), other=0.0)
        acc = tl.dot(a, b, acc, input_precision=PREC, out_dtype=ACC)
    out = grad_x + ((m.to(tl.int64) * K + k) * C)[:, None] + c[None, :]
    tl.store(out, acc.to(grad_x.dtype.element_ty), mask=(m[:, None] < M) & (c[None, :] < C))


@triton.jit
def _grad_weight(x, grad_y, partial, M, H, W, CHUNK, K, C: tl.constexpr, OUT: tl.constexpr,
                 SPLIT, BM: tl.constexpr, BC: tl.constexpr, BN: tl.constexpr,
                 ACC: tl.constexpr, PREC: tl.constexpr):
    blocks_c: tl.constexpr = (C + BC - 1) // BC
    t, cb = tl.program_id(0) // blocks_c, tl.program_id(0) % blocks_c
    k, part = tl.program_id(2) // SPLIT, tl.program_id(2) % SPLIT
    c = cb * BC + tl.arange(0, BC)
    n = tl.program_id(1) * BN + tl.arange(0, BN)
    acc = tl.zeros((BC, BN), ACC)
    for m0 in range(part * CHUNK, (part + 1) * CHUNK, BM):  # this program's chunk of the pixel sum, in order
        m = m0 + tl.arange(0, BM)
        src, inside = _neighbour(m, (m // W) % H, m % W, M, H, W, t // 3 - 1, t % 3 - 1)
        a = tl.load(x + ((src * K + k) * C)[:, None] + c[None, :], mask=inside[:, None] & (c[None, :] < C), other=0.0)
        b = tl.load(grad_y + ((m.to(tl.int64) * K + k) * OUT)[:, None] + n[None, :],
                    mask=(m[:, None] < M) & (n[None, :] < OUT), other=0.0)
        acc = tl.dot(tl.trans(a), b, acc, input_precision=PREC, out_dtype=ACC)
    out = partial + ((part * K + k) * 9 * C + t * C + c)[:, None] * OUT + n[None, :]
    tl.store(out, acc, mask=(c[:, None] < C) & (n[None, :] < OUT))


def _accumulator(x: torch.Tensor) -> torch.dtype:
    """The dtype sums over x are accumulated in: float64 for float64 inputs, else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _precision(x: torch.Tensor) -> dict:
    """Accumulator dtype and tl.dot input precision: fp64 exact, fp32 TF32 where cuDNN's convs may use it, else fp32."""
    tf32 = x.dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return {"ACC": tl.float64 if _accumulator(x) == torch.float64 else tl.float32, "PREC": "tf32" if tf32 else "ieee"}


def _processors(x: torch.Tensor) -> int:
    """Streaming multiprocessors of x's GPU (2 under the interpreter, so that the tests cut the pixel sum)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2


def forward(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """y[b, h, w, k] = sum over taps t and channels c of x at (h, w) + tap offset times weight[k, t*C + c] + bias[k]."""
    b, h, w, k, c = x.shape
    out = weight.shape[2]
    y = x.new_empty(b, h, w, k, out)
    launch = configs(c, out)["_forward"]
    grid = (triton.cdiv(b * h * w, launch["BM"]), triton.cdiv(out, launch["BN"]), k)
    _forward[grid](x, weight, bias, y, b * h * w, h, w, K=k, C=c, OUT=out, **launch, **_precision(x))
    return y


def grad_input(grad_y: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The input gradient: grad_y's shifted neighbourhoods times the weights (a convolution with mirrored taps)."""
    b, h, w, k, out = grad_y.shape
    c = weight.shape[1] // 9
    grad_x = grad_y.new_empty(b, h, w, k, c)
    launch = configs(c, out)["_grad_input"]
    grid = (triton.cdiv(b * h * w, launch["BM"]), triton.cdiv(c, launch["BN"]), k)
    _grad_input[grid](grad_y, weight, grad_x, b * h * w, h, w, K=k, C=c, OUT=out, **launch, **_precision(grad_y))
    return grad_x


def grad_weight(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The weight gradient [K, 9C, OUT] in the accumulator's dtype: per-chunk pixel sums, then added in chunk order."""
    b, h, w, k, c = x.shape
    out, pixels = grad_y.shape[4], b * h * w
    launch = configs(c, out)["_grad_weight"]
    blocks, rows = (9 * triton.cdiv(c, launch["BC"]), triton.cdiv(out, launch["BN"])), launch["BM"]
    split = weight_split(blocks[0] * blocks[1] * k, triton.cdiv(pixels, rows), _processors(x))
    chunk = triton.cdiv(triton.cdiv(pixels, split), rows) * rows
    partial = x.new_empty(split, k, 9 * c, out, dtype=_accumulator(x))
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
        grad_b = grad_y.view(-1, *grad_y.shape[3:]).sum(0, dtype=_accumulator(x))
        return grad_x, grad_w, grad_b.to(weight.dtype)
