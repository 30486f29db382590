"""A norm (BatchNorm with batch statistics, or GroupNorm), 2x2 max-pool and ReLU of channels-last maps in four Triton kernels.

PyTorch runs a block's norm, MaxPool2d(2) and ReLU as separate kernels, each reading and writing the whole map,
and the pool stores an int64 index per output. At K=64 stacked members the first block's map is 0.4 GB in bf16,
and those passes, not the convolutions, are the likeliest filler of the step. Here the forward reads the conv's
output twice (per image and channel statistics, then normalise-pool-ReLU writing only the pooled map) and the
backward twice (per image and channel sums, then the input gradient), recomputing each window's argmax instead of
storing it. BatchNorm's statistics merge the images', GroupNorm's a group's channels' (Chan et al.), in a fixed
order: no atomics, deterministic on one card. Off CUDA the kernels run only under Triton's interpreter
(TRITON_INTERPRET=1), which is how the tests check them against PyTorch's ops.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import nn

from .fused_conv import accumulator

BLOCK_ROWS, BLOCK_CHANNELS = 32, 64  # each program's tile: rows (pixels or pool windows) x channels


@triton.jit
def _window(q, QH, QW, H, W, S: tl.constexpr, i):
    """Input pixel i (row-major in the S x S window) of windows q on a QH x QW window grid: flat index, and whether it exists."""
    b, r = q // (QH * QW), q % (QH * QW)
    h, w = (r // QW) * S + i // S, (r % QW) * S + i % S
    return ((b * H + h) * W + w).to(tl.int64), (h < H) & (w < W)


@triton.jit
def _window_max(x, scale, shift, q, c, live, QH, QW, H, W, C,
                S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Each window's largest normalised value x * scale + shift (NaN if any is NaN), its position in the window and
    its input value; scale and shift are [BR, BC] (each window's image's) or [1, BC]."""
    best = tl.full((BR, BC), float("-inf"), ACC)
    arg = tl.zeros((BR, BC), tl.int32)
    chosen = tl.zeros((BR, BC), ACC)
    for i in tl.static_range(S * S):
        src, ok = _window(q, QH, QW, H, W, S, i)
        mask = (live & ok)[:, None] & (c < C)[None, :]
        v = tl.load(x + src[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        y = tl.where(mask, v * scale + shift, float("-inf"))
        take = (y > best) | (y != y)  # the first maximum in the window, as max_pool2d's; a NaN wins
        best, arg, chosen = tl.where(take, y, best), tl.where(take, i, arg), tl.where(take, v, chosen)
    return best, arg, chosen


@triton.jit
def _per_image(table, img, c, C):
    """A [B, C] table's entries for image img's channels c, as a [1, BC] row."""
    return tl.load(table + img * C + c, mask=c < C, other=0.0)[None, :]


@triton.jit
def _stats(x, mean, m2, P, C, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Per channel, the mean and summed squared deviation of one image's P pixels, merged tile by tile (Chan et al.)."""
    img, c = tl.program_id(0), tl.program_id(1) * BC + tl.arange(0, BC)
    mu, ss, n = tl.zeros((BC,), ACC), tl.zeros((BC,), ACC), tl.zeros((BC,), ACC)
    for r0 in range(0, P, BR):
        rows = r0 + tl.arange(0, BR)
        mask = (rows < P)[:, None] & (c < C)[None, :]
        v = tl.load(x + (img.to(tl.int64) * P + rows)[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        count = tl.minimum(P - r0, BR).to(ACC)
        tile_mean = tl.sum(v, 0) / count
        d = tl.where(mask, v - tile_mean[None, :], 0.0)
        total = n + count
        delta = tile_mean - mu
        mu += delta * count / total
        ss += tl.sum(d * d, 0) + delta * delta * n * count / total
        n = total
    tl.store(mean + img * C + c, mu, mask=c < C)
    tl.store(m2 + img * C + c, ss, mask=c < C)


@triton.jit
def _forward(x, scale, shift, out, H, W, C, S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """out[window] = ReLU(max over the window of x * scale + shift), over image program_id(2)'s H//S x W//S windows."""
    local, c, img = tl.program_id(0) * BR + tl.arange(0, BR), tl.program_id(1) * BC + tl.arange(0, BC), tl.program_id(2)
    windows = (H // S) * (W // S)
    q, live = img * windows + local, local < windows
    sc, sh = _per_image(scale, img, c, C), _per_image(shift, img, c, C)
    best, _, _ = _window_max(x, sc, sh, q, c, live, H // S, W // S, H, W, C, S, BR, BC, ACC)
    y = tl.where(best > 0, best, tl.where(best != best, best, 0.0))  # ReLU keeps NaN, as torch.relu does
    mask = live[:, None] & (c < C)[None, :]
    tl.store(out + q.to(tl.int64)[:, None] * C + c[None, :], y.to(out.dtype.element_ty), mask=mask)


@triton.jit
def _grad_sums(x, scale, shift, mean, rstd, grad, sum_dy, sum_dyx, H, W, C,
               S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """Per channel of one image, the sums of dy and dy * xhat, dy being the gradient reaching the norm's output (its
    window's argmax only, where the ReLU passed it)."""
    img, c = tl.program_id(0), tl.program_id(1) * BC + tl.arange(0, BC)
    sc, sh = _per_image(scale, img, c, C), _per_image(shift, img, c, C)
    mu, rs = _per_image(mean, img, c, C), _per_image(rstd, img, c, C)
    dy_sum, dyx_sum = tl.zeros((BC,), ACC), tl.zeros((BC,), ACC)
    windows = (H // S) * (W // S)
    for w0 in range(0, windows, BR):
        q = img * windows + w0 + tl.arange(0, BR)
        live = w0 + tl.arange(0, BR) < windows
        best, _, chosen = _window_max(x, sc, sh, q, c, live, H // S, W // S, H, W, C, S, BR, BC, ACC)
        mask = live[:, None] & (c < C)[None, :] & (best > 0)
        dy = tl.load(grad + q.to(tl.int64)[:, None] * C + c[None, :], mask=mask, other=0.0).to(ACC)
        dy_sum += tl.sum(dy, 0)
        dyx_sum += tl.sum(dy * (chosen - mu) * rs, 0)
    tl.store(sum_dy + img * C + c, dy_sum, mask=c < C)
    tl.store(sum_dyx + img * C + c, dyx_sum, mask=c < C)


@triton.jit
def _grad_input(x, scale, shift, mean, rstd, coef_a, coef_b, grad, grad_x, H, W, C,
                S: tl.constexpr, BR: tl.constexpr, BC: tl.constexpr, ACC: tl.constexpr):
    """dx = scale * dy - a - xhat * b at every input pixel of image program_id(2) (a, b: the norm's terms per image and
    channel), over its ceil(H/S) x ceil(W/S) windows (a partial window at an odd edge is pooled by none: dy = 0)."""
    local, c, img = tl.program_id(0) * BR + tl.arange(0, BR), tl.program_id(1) * BC + tl.arange(0, BC), tl.program_id(2)
    QH, QW, HO, WO = (H + S - 1) // S, (W + S - 1) // S, H // S, W // S
    q, live = img * QH * QW + local, local < QH * QW
    sc, sh = _per_image(scale, img, c, C), _per_image(shift, img, c, C)
    mu, rs = _per_image(mean, img, c, C), _per_image(rstd, img, c, C)
    a, b = _per_image(coef_a, img, c, C), _per_image(coef_b, img, c, C)
    best, arg, _ = _window_max(x, sc, sh, q, c, live, QH, QW, H, W, C, S, BR, BC, ACC)
    pooled = live & (local // QW < HO) & (local % QW < WO)
    out = ((img * HO + local // QW) * WO + local % QW).to(tl.int64)
    dy = tl.load(grad + out[:, None] * C + c[None, :], mask=pooled[:, None] & (c < C)[None, :] & (best > 0), other=0.0)
    for i in tl.static_range(S * S):
        src, ok = _window(q, QH, QW, H, W, S, i)
        inside = (live & ok)[:, None] & (c < C)[None, :]
        v = tl.load(x + src[:, None] * C + c[None, :], mask=inside, other=0.0).to(ACC)
        dx = sc * tl.where(arg == i, dy.to(ACC), 0.0) - a - (v - mu) * rs * b
        tl.store(grad_x + src[:, None] * C + c[None, :], dx.to(grad_x.dtype.element_ty), mask=inside)


def _launch(acc: torch.dtype, **window) -> dict:
    """Tile sizes and accumulator of a launch (and S, the pool's window side, for the kernels that pool)."""
    return {"BR": BLOCK_ROWS, "BC": BLOCK_CHANNELS, "ACC": tl.float64 if acc == torch.float64 else tl.float32, **window}


def image_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel of x [B, H, W, C] (contiguous): the mean and summed squared deviation over H x W, [B, C]."""
    b, h, w, c = x.shape
    mean, m2 = (x.new_empty(b, c, dtype=accumulator(x)) for _ in range(2))
    _stats[(b, triton.cdiv(c, BLOCK_CHANNELS))](x, mean, m2, h * w, c, **_launch(mean.dtype))
    return mean, m2


def merged(mean: torch.Tensor, m2: torch.Tensor, count: int, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and biased variance of parts of `count` values each (their means and summed squared deviations along dim),
    merged in a fixed order: Chan et al.'s pairwise formula, exact however the parts fall."""
    total = mean.mean(dim, keepdim=True)
    squares = m2.sum(dim, keepdim=True) + count * (mean - total).square().sum(dim, keepdim=True)
    return total, squares / (count * mean.shape[dim])


def pool_forward(x, scale, shift, pool: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """ReLU(max_pool(x * scale + shift, pool)) of x [B, H, W, C], scale and shift [B, C]: [B, H // pool, W // pool, C]."""
    b, h, w, c = x.shape
    out = x.new_empty(b, h // pool, w // pool, c, dtype=out_dtype or x.dtype)
    grid = (triton.cdiv((h // pool) * (w // pool), BLOCK_ROWS), triton.cdiv(c, BLOCK_CHANNELS), b)
    _forward[grid](x, scale, shift, out, h, w, c, **_launch(scale.dtype, S=pool))
    return out


def grad_sums(x, scale, shift, mean, rstd, grad, pool: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, the sums of dy and dy * xhat ([B, C] each): dy reaches the norm's output at each pooled
    window's argmax where the ReLU passed it."""
    b, _, _, c = x.shape
    sum_dy, sum_dyx = (torch.empty_like(scale) for _ in range(2))
    _grad_sums[(b, triton.cdiv(c, BLOCK_CHANNELS))](x, scale, shift, mean, rstd, grad, sum_dy, sum_dyx, x.shape[1],
                                                     x.shape[2], c, **_launch(scale.dtype, S=pool))
    return sum_dy, sum_dyx


def grad_input(x, scale, shift, mean, rstd, coef_a, coef_b, grad, pool: int) -> torch.Tensor:
    """dx = scale * dy - coef_a - xhat * coef_b at every pixel of x (all but x and grad: [B, C])."""
    b, h, w, c = x.shape
    grad_x = torch.empty_like(x)
    cells = triton.cdiv(h, pool) * triton.cdiv(w, pool)  # windows of an image, partial ones at odd edges included
    _grad_input[(triton.cdiv(cells, BLOCK_ROWS), triton.cdiv(c, BLOCK_CHANNELS), b)](
        x, scale, shift, mean, rstd, coef_a, coef_b, grad, grad_x, h, w, c, **_launch(scale.dtype, S=pool))
    return grad_x


def per_pixel_row(t: torch.Tensor, b: int, c: int) -> torch.Tensor:
    """A statistic per channel ([1, C]) or per image and group ([B, G, 1]) as a contiguous [B, C] table."""
    return (t.expand(b, c) if t.dim() == 2 else t.expand(b, t.shape[1], c // t.shape[1]).reshape(b, c)).contiguous()


class NormPoolReLUFunction(torch.autograd.Function):
    """ReLU(max_pool(norm(x), pool)) of x [B, H, W, C]: norm is BatchNorm with batch statistics (groups 0; the running
    ones updated in place) or GroupNorm(groups, C)."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, momentum, eps, pool, groups, out_dtype):
        x = x.contiguous()
        b, h, w, c = x.shape
        mean, m2 = image_stats(x)
        if groups:
            mean, var = merged(mean.view(b, groups, -1), m2.view(b, groups, -1), h * w, 2)  # [B, G, 1]
        else:
            mean, var = merged(mean, m2, h * w, 0)  # [1, C]
            n = b * h * w
            running_mean.lerp_(mean[0].to(running_mean.dtype), momentum)
            running_var.lerp_((var[0] * n / max(n - 1, 1)).to(running_var.dtype), momentum)  # unbiased, as BatchNorm keeps
        mean, rstd = per_pixel_row(mean, b, c), per_pixel_row((var + eps).rsqrt(), b, c)
        scale = (weight.to(mean.dtype) * rstd).contiguous()
        shift = (bias.to(mean.dtype) - mean * scale).contiguous()
        ctx.save_for_backward(x, weight, mean, rstd, scale, shift)
        ctx.pool, ctx.groups = pool, groups
        return pool_forward(x, scale, shift, pool, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, rstd, scale, shift = ctx.saved_tensors
        b, h, w, c = x.shape
        grad = grad.contiguous()
        sum_dy, sum_dyx = grad_sums(x, scale, shift, mean, rstd, grad, ctx.pool)
        if ctx.groups:  # dx = rstd * (gamma dy - mean over the group of gamma dy - xhat * that of gamma dy xhat)
            gamma, n = weight.to(scale.dtype), h * w * c // ctx.groups
            per_group = lambda s: (gamma * s).view(b, ctx.groups, -1).sum(2, keepdim=True) / n  # noqa: E731
            coef_a, coef_b = rstd * per_pixel_row(per_group(sum_dy), b, c), rstd * per_pixel_row(per_group(sum_dyx), b, c)
        else:  # dx = gamma rstd * (dy - mean of dy - xhat * mean of dy xhat), means over the batch's pixels
            n = b * h * w
            coef_a, coef_b = scale * (sum_dy.sum(0) / n), scale * (sum_dyx.sum(0) / n)
        grad_x = grad_input(x, scale, shift, mean, rstd, coef_a.contiguous(), coef_b.contiguous(), grad, ctx.pool)
        return (grad_x, sum_dyx.sum(0).to(weight.dtype), sum_dy.sum(0).to(weight.dtype)) + (None,) * 7


def fusable(norm: nn.Module) -> bool:
    """An affine GroupNorm, or an affine BatchNorm2d keeping running statistics with a momentum (StableNet's norms)."""
    if isinstance(norm, nn.GroupNorm):
        return norm.affine
    return isinstance(norm, nn.BatchNorm2d) and norm.affine and norm.track_running_stats and norm.momentum is not None


def two_by_two(layer: nn.Module) -> bool:
    """Whether layer is max_pool2d with 2x2 windows, stride 2, no padding or dilation, floor mode (StableNet's pool)."""
    return (isinstance(layer, nn.MaxPool2d) and layer.kernel_size in (2, (2, 2)) and layer.stride in (2, (2, 2))
            and layer.padding in (0, (0, 0)) and layer.dilation in (1, (1, 1)) and not layer.ceil_mode)


@functools.cache
def group_norm_dtype(device: str, dtype: torch.dtype, autocast: torch.dtype | None) -> torch.dtype:
    """The dtype F.group_norm gives for dtype input on device under autocast to `autocast` (None: off); asked of
    PyTorch once, not restated from its autocast op lists."""
    with torch.autocast(device, dtype=autocast or dtype, enabled=autocast is not None):
        return F.group_norm(torch.zeros(1, 1, 2, 1, dtype=dtype, device=device), 1).dtype


def norm_pool_relu(norm: nn.Module, x: torch.Tensor, pool: int) -> torch.Tensor:
    """ReLU(max_pool(norm(x))) of x [B, C, H, W] in training mode, through the kernels; channels-last out."""
    device = x.device.type
    if isinstance(norm, nn.GroupNorm):  # CUDA's autocast runs group_norm in float32, the CPU's in the input's dtype
        autocast = (torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None)
        args = (None, None, 0.0, norm.eps, pool, norm.num_groups, group_norm_dtype(device, x.dtype, autocast))
    else:
        norm.num_batches_tracked.add_(1)
        args = (norm.running_mean, norm.running_var, norm.momentum, norm.eps, pool, 0, x.dtype)
    with torch.autocast(device, enabled=False):
        out = NormPoolReLUFunction.apply(x.permute(0, 2, 3, 1), norm.weight, norm.bias, *args)
    return out.permute(0, 3, 1, 2)


class FusedNormSequential(nn.Sequential):
    """An nn.Sequential whose runs of norm, optional 2x2 max-pool and ReLU go through the kernels while training (the
    same modules, parameter names and state; evaluation runs them as they are). plain() gives the nn.Sequential back."""

    def __init__(self, layers):
        super().__init__(*layers)
        self.runs = {}  # first layer of a run -> (pool, layer after the run)
        for i, layer in enumerate(layers):
            pooled = i + 1 < len(layers) and two_by_two(layers[i + 1])
            relu = i + 1 + pooled
            if fusable(layer) and relu < len(layers) and isinstance(layers[relu], nn.ReLU):
                self.runs[i] = (2 if pooled else 1, relu + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return super().forward(x)
        layers, i = list(self), 0
        while i < len(layers):
            if i in self.runs:
                pool, after = self.runs[i]
                x, i = norm_pool_relu(layers[i], x, pool), after
            else:
                x, i = layers[i](x), i + 1
        return x

    def plain(self) -> nn.Sequential:
        return nn.Sequential(*self)
