"""BatchNorm with batch statistics, 2x2 max-pool and ReLU of a stacked model's channels-last maps in four Triton kernels.

PyTorch runs a block's BatchNorm2d, MaxPool2d(2) and ReLU as separate kernels, each reading and writing the whole
map, and the pool stores an int64 index per output. At K=64 members the first block's map is 0.4 GB in bf16 and
those passes, not the convolutions, fill most of the step. Here the forward reads the conv's output twice
(statistics, then normalise-pool-ReLU writing only the pooled map) and the backward twice (its two sums, then the
input gradient), recomputing each window's argmax instead of storing it. Statistics merge per-chunk means and
squared deviations (Chan et al.) in a fixed order: no atomics, deterministic on one card. Off CUDA the kernels run
only under Triton's interpreter (TRITON_INTERPRET=1), which is how the tests check them against PyTorch's ops.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

BLOCK_ROWS, BLOCK_CHANNELS = 32, 64  # each program's tile: rows (pixels or pool windows) x channels
PROGRAMS_PER_SM = 4  # the statistics' and gradient sums' rows are cut until there are this many programs a multiprocessor


@triton.jit
def _window(q, QH, QW, H, W, S: tl.constexpr, i):
    """Input pixel i (row-major in the S x S window) of windows q on a QH x QW window grid: flat index, and whether it exists."""
    b, r = q // (QH * QW), q % (QH * QW)
    h, w = (r // QW) * S + i // S, (r % QW) * S + i % S
    return ((b * H + h) * W + w).to(tl.int64), (h < H) & (w < W)


@triton.jit
def _window_max(x, scale, shift, q, c, live, QH, QW, H, W, C,
                S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Each window's largest normalised value (NaN if any is NaN), its position in the window and its input value."""
    best = tl.full((BR, BC), float("-inf"), ACC)
    arg = tl.zeros((BR, BC), tl.int32)
    chosen = tl.zeros((BR, BC), ACC)
    for i in tl.static_range(S * S):
        src, ok = _window(q, QH, QW, H, W, S, i)
        mask = (live & ok)[:, None] & (c < C)[None, :]
        v = tl.load(x + src[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        y = tl.where(mask, v * scale[None, :] + shift[None, :], float("-inf"))
        take = (y > best) | (y != y)  # the first maximum in the window, as max_pool2d's; a NaN wins
        best, arg, chosen = tl.where(take, y, best), tl.where(take, i, arg), tl.where(take, v, chosen)
    return best, arg, chosen


@triton.jit
def _stats(x, part_mean, part_m2, N, C, CHUNK, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Per channel, the mean and summed squared deviation of this program's chunk of rows (merged tile by tile)."""
    part, c = tl.program_id(0), tl.program_id(1) * BC + tl.arange(0, BC)
    mean, m2, n = tl.zeros((BC,), ACC), tl.zeros((BC,), ACC), tl.zeros((BC,), ACC)
    for r0 in range(part * CHUNK, part * CHUNK + CHUNK, BR):
        rows = r0 + tl.arange(0, BR)
        mask = (rows < N)[:, None] & (c < C)[None, :]
        v = tl.load(x + rows.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        count = tl.maximum(tl.minimum(N - r0, BR), 0).to(ACC)  # 0 past the end: the merge below then changes nothing
        tile_mean = tl.sum(v, 0) / tl.maximum(count, 1.0)
        d = tl.where(mask, v - tile_mean[None, :], 0.0)
        total = n + count
        delta = tile_mean - mean
        mean += delta * count / total
        m2 += tl.sum(d * d, 0) + delta * delta * n * count / total
        n = total
    tl.store(part_mean + part * C + c, mean, mask=c < C)
    tl.store(part_m2 + part * C + c, m2, mask=c < C)


@triton.jit
def _forward(x, scale, shift, out, Q, H, W, C, S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """out[window] = ReLU(max over the window of x * scale + shift), over the H//S x W//S windows."""
    q, c = tl.program_id(0) * BR + tl.arange(0, BR), tl.program_id(1) * BC + tl.arange(0, BC)
    sc, sh = tl.load(scale + c, mask=c < C, other=0.0), tl.load(shift + c, mask=c < C, other=0.0)
    best, _, _ = _window_max(x, sc, sh, q, c, q < Q, H // S, W // S, H, W, C, S, BR, BC, ACC)
    y = tl.where(best > 0, best, tl.where(best != best, best, 0.0))  # ReLU keeps NaN, as torch.relu does
    tl.store(out + q.to(tl.int64)[:, None] * C + c[None, :], y.to(out.dtype.element_ty), mask=(q < Q)[:, None] & (c < C)[None, :])


@triton.jit
def _grad_sums(x, scale, shift, mean, rstd, grad, part_dy, part_dyx, Q, H, W, C, CHUNK,
               S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Per channel, this chunk's sums of dy and dy * xhat, dy being the gradient reaching the norm's output (its window's
    argmax only, where the ReLU passed it)."""
    part, c = tl.program_id(0), tl.program_id(1) * BC + tl.arange(0, BC)
    sc, sh = tl.load(scale + c, mask=c < C, other=0.0), tl.load(shift + c, mask=c < C, other=0.0)
    mu, rs = tl.load(mean + c, mask=c < C, other=0.0), tl.load(rstd + c, mask=c < C, other=0.0)
    dy_sum, dyx_sum = tl.zeros((BC,), ACC), tl.zeros((BC,), ACC)
    for q0 in range(part * CHUNK, part * CHUNK + CHUNK, BR):
        q = q0 + tl.arange(0, BR)
        best, _, chosen = _window_max(x, sc, sh, q, c, q < Q, H // S, W // S, H, W, C, S, BR, BC, ACC)
        mask = (q < Q)[:, None] & (c < C)[None, :] & (best > 0)
        dy = tl.load(grad + q.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        dy_sum += tl.sum(dy, 0)
        dyx_sum += tl.sum(dy * (chosen - mu[None, :]) * rs[None, :], 0)
    tl.store(part_dy + part * C + c, dy_sum, mask=c < C)
    tl.store(part_dyx + part * C + c, dyx_sum, mask=c < C)


@triton.jit
def _grad_input(x, scale, shift, mean, rstd, grad, mean_dy, mean_dyx, grad_x, Q, H, W, C,
                S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """dx = scale * (dy - mean(dy) - xhat * mean(dy * xhat)) at every input pixel, over ceil(H/S) x ceil(W/S) windows
    (a partial window at an odd edge is pooled by none: dy = 0 there)."""
    q, c = tl.program_id(0) * BR + tl.arange(0, BR), tl.program_id(1) * BC + tl.arange(0, BC)
    QH, QW, HO, WO = (H + S - 1) // S, (W + S - 1) // S, H // S, W // S
    sc, sh = tl.load(scale + c, mask=c < C, other=0.0), tl.load(shift + c, mask=c < C, other=0.0)
    mu, rs = tl.load(mean + c, mask=c < C, other=0.0), tl.load(rstd + c, mask=c < C, other=0.0)
    a, b = tl.load(mean_dy + c, mask=c < C, other=0.0), tl.load(mean_dyx + c, mask=c < C, other=0.0)
    best, arg, _ = _window_max(x, sc, sh, q, c, q < Q, QH, QW, H, W, C, S, BR, BC, ACC)
    img, r = q // (QH * QW), q % (QH * QW)
    pooled = (q < Q) & (r // QW < HO) & (r % QW < WO)
    out = ((img * HO + r // QW) * WO + r % QW).to(tl.int64)
    live = pooled[:, None] & (c < C)[None, :] & (best > 0)
    dy = tl.load(grad + out[:, None] * C + c[None, :], mask=live, other=0.0).to(ACC)
    for i in tl.static_range(S * S):
        src, ok = _window(q, QH, QW, H, W, S, i)
        mask = ((q < Q) & ok)[:, None] & (c < C)[None, :]
        v = tl.load(x + src[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        xhat = (v - mu[None, :]) * rs[None, :]
        dx = sc[None, :] * (tl.where(arg == i, dy, 0.0) - a[None, :] - xhat * b[None, :])
        tl.store(grad_x + src[:, None] * C + c[None, :], dx.to(grad_x.dtype.element_ty), mask=mask)


def _accumulator(x: torch.Tensor) -> torch.dtype:
    """float64 sums for float64 maps (the tests' exact comparisons), else float32."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _processors(x: torch.Tensor) -> int:
    """Streaming multiprocessors of x's GPU (2 under the interpreter, so that the tests cut the sums into chunks)."""
    return torch.cuda.get_device_properties(x.device).multi_processor_count if x.is_cuda else 2


def _split(rows: int, x: torch.Tensor, channel_blocks: int) -> tuple[int, int]:
    """(chunks, rows per chunk) of a sum over rows: about PROGRAMS_PER_SM programs a multiprocessor, no chunk empty."""
    wanted = max(1, min(triton.cdiv(rows, BLOCK_ROWS), -(-PROGRAMS_PER_SM * _processors(x) // channel_blocks)))
    chunk = triton.cdiv(triton.cdiv(rows, wanted), BLOCK_ROWS) * BLOCK_ROWS
    return triton.cdiv(rows, chunk), chunk


def batch_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of x [..., C] (contiguous), chunk partials merged in chunk order."""
    c, acc = x.shape[-1], _accumulator(x)
    rows = x.numel() // c
    blocks = triton.cdiv(c, BLOCK_CHANNELS)
    parts, chunk = _split(rows, x, blocks)
    part_mean, part_m2 = (x.new_empty(parts, c, dtype=acc) for _ in range(2))
    _stats[(parts, blocks)](x, part_mean, part_m2, rows, c, chunk, BR=BLOCK_ROWS, BC=BLOCK_CHANNELS, ACC=_tl(acc))
    counts = (rows - torch.arange(parts, dtype=acc, device=x.device) * chunk).clamp(max=chunk)[:, None]
    mean = (counts * part_mean).sum(0) / rows
    return mean, (part_m2 + counts * (part_mean - mean) ** 2).sum(0) / rows


def _tl(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


def pool_forward(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor, pool: int) -> torch.Tensor:
    """ReLU(max_pool(x * scale + shift, pool)) of x [B, H, W, C]: [B, H // pool, W // pool, C] in x's dtype."""
    b, h, w, c = x.shape
    out = x.new_empty(b, h // pool, w // pool, c)
    windows = out.numel() // c
    grid = (triton.cdiv(windows, BLOCK_ROWS), triton.cdiv(c, BLOCK_CHANNELS))
    _forward[grid](x, scale, shift, out, windows, h, w, c, S=pool, BR=BLOCK_ROWS, BC=BLOCK_CHANNELS, ACC=_tl(scale.dtype))
    return out


def pool_backward(x, scale, shift, mean, rstd, grad, pool: int):
    """(dx, d scale-free sums): the input gradient and the sums of dy and dy * xhat (the weight's and bias's gradients)."""
    b, h, w, c = x.shape
    acc, launch = scale.dtype, {"S": pool, "BR": BLOCK_ROWS, "BC": BLOCK_CHANNELS, "ACC": _tl(scale.dtype)}
    windows, blocks = grad.numel() // c, triton.cdiv(c, BLOCK_CHANNELS)
    parts, chunk = _split(windows, x, blocks)
    part_dy, part_dyx = (x.new_empty(parts, c, dtype=acc) for _ in range(2))
    _grad_sums[(parts, blocks)](x, scale, shift, mean, rstd, grad, part_dy, part_dyx, windows, h, w, c, chunk, **launch)
    dy, dyx = part_dy.sum(0), part_dyx.sum(0)
    grad_x = torch.empty_like(x)
    cells = b * triton.cdiv(h, pool) * triton.cdiv(w, pool)
    n = b * h * w
    _grad_input[(triton.cdiv(cells, BLOCK_ROWS), blocks)](x, scale, shift, mean, rstd, grad, dy / n, dyx / n, grad_x,
                                                           cells, h, w, c, **launch)
    return grad_x, dyx, dy


class BatchNormPoolReLUFunction(torch.autograd.Function):
    """ReLU(max_pool(batch_norm(x), pool)) of x [B, H, W, C] with batch statistics; updates the running ones in place."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum: float, eps: float, pool: int):
        x = x.contiguous()
        mean, var = batch_stats(x)
        n = x.numel() // x.shape[-1]
        with torch.no_grad():
            running_mean.lerp_(mean.to(running_mean.dtype), momentum)
            running_var.lerp_((var * n / max(n - 1, 1)).to(running_var.dtype), momentum)  # unbiased, as BatchNorm2d keeps
        rstd = (var + eps).rsqrt()
        scale = weight.to(mean.dtype) * rstd
        shift = bias.to(mean.dtype) - mean * scale
        ctx.save_for_backward(x, mean, rstd, scale, shift)
        ctx.pool, ctx.param_dtype = pool, weight.dtype
        return pool_forward(x, scale, shift, pool)

    @staticmethod
    def backward(ctx, grad):
        x, mean, rstd, scale, shift = ctx.saved_tensors
        grad_x, grad_weight, grad_bias = pool_backward(x, scale, shift, mean, rstd, grad.contiguous(), ctx.pool)
        return grad_x, grad_weight.to(ctx.param_dtype), grad_bias.to(ctx.param_dtype), None, None, None, None, None


class FusedBatchNormPoolReLU(nn.BatchNorm2d):
    """A BatchNorm2d, then MaxPool2d(pool) (pool 1: none), then ReLU, as one module with the BatchNorm's parameters and
    buffers. Training runs the kernels on channels-last maps; evaluation (running statistics) runs PyTorch's ops."""

    def __init__(self, norm: nn.BatchNorm2d, pool: int):
        if norm.momentum is None or not norm.affine or not norm.track_running_stats:
            raise ValueError(f"fusing takes an affine BatchNorm2d with running statistics and a momentum, not {norm}")
        super().__init__(norm.num_features, eps=norm.eps, momentum=norm.momentum, device=norm.weight.device)
        self.load_state_dict(norm.state_dict())
        self.pool = pool

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            y = super().forward(x)
            return F.relu(F.max_pool2d(y, self.pool) if self.pool > 1 else y)
        self.num_batches_tracked.add_(1)
        out = BatchNormPoolReLUFunction.apply(x.permute(0, 2, 3, 1), self.weight, self.bias, self.running_mean,
                                              self.running_var, self.momentum, self.eps, self.pool)
        return out.permute(0, 3, 1, 2)  # channels-last [B, C, H // pool, W // pool]


def two_by_two(layer: nn.Module) -> bool:
    """Whether layer is max_pool2d with 2x2 windows, stride 2, no padding or dilation, floor mode (StableNet's pool)."""
    return (isinstance(layer, nn.MaxPool2d) and layer.kernel_size in (2, (2, 2)) and layer.stride in (2, (2, 2))
            and layer.padding in (0, (0, 0)) and layer.dilation in (1, (1, 1)) and not layer.ceil_mode)


def fuse_norms(layers: list[nn.Module]) -> list[nn.Module]:
    """Each BatchNorm2d followed by ReLU, or by a 2x2 max-pool and ReLU, as one FusedBatchNormPoolReLU; the modules
    it absorbs become Identity, so that every index, hence every parameter's name, stays."""
    fused = list(layers)
    for i, layer in enumerate(layers):
        pooled = i + 1 < len(layers) and two_by_two(layers[i + 1])
        relu = i + 1 + pooled
        if isinstance(layer, nn.BatchNorm2d) and relu < len(layers) and isinstance(layers[relu], nn.ReLU):
            fused[i] = FusedBatchNormPoolReLU(layer, 2 if pooled else 1)
            fused[i + 1:relu + 1] = [nn.Identity() for _ in range(relu - i)]
    return fused
