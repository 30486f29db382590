"""K members' 3x3 convolutions as one batched matrix multiply (im2col + bmm) instead of one grouped convolution.

Activations stay in the stacked model's channels-last layout, [B, H, W, K, C] in memory. im2col writes each
pixel's 3x3 neighbourhood per member as one row of 9C values (plus a 1 for the bias, zero-padded so that
rows start 16-byte aligned for tensor cores); member k's conv is then rows_k @ W_k, and the K products are
one strided batched GEMM writing straight into the [B, H, W, K, O] output.
The backward sums the 9 shifted gradient slices in a fixed order (no atomics: deterministic).
On an H100 it beats cuDNN's grouped convolution only on the first layer (one channel per member: 1.7x);
with 32-64 input channels the 9x im2col copy costs more than the GEMMs save (README, "On a GPU").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

TAPS = [(dy, dx) for dy in range(3) for dx in range(3)]  # row-major over the 3x3 kernel: tap t = 3 * dy + dx
ALIGN = 8  # row length multiple: 16 bytes in bf16, so every member's rows start aligned


def row_length(channels: int) -> int:
    """9 taps x channels, one bias column, padded to ALIGN."""
    return -(-(9 * channels + 1) // ALIGN) * ALIGN


def im2col(x: torch.Tensor) -> torch.Tensor:
    """[B, H, W, K, C] -> [B, H, W, K, row_length(C)]: 3x3 neighbourhoods (zero padded), then 1, then zeros."""
    b, h, w, k, c = x.shape
    padded = F.pad(x, (0, 0, 0, 0, 1, 1, 1, 1))
    cols = x.new_empty(b, h, w, k, row_length(c))
    for t, (dy, dx) in enumerate(TAPS):
        cols[..., t * c:(t + 1) * c] = padded[:, dy:dy + h, dx:dx + w]
    cols[..., 9 * c] = 1
    cols[..., 9 * c + 1:] = 0
    return cols


def col2im(grad_cols: torch.Tensor, channels: int) -> torch.Tensor:
    """Adjoint of im2col: [B, H, W, K, row_length(C)] -> [B, H, W, K, C], the 9 slices added in tap order."""
    b, h, w, k, _ = grad_cols.shape
    padded = grad_cols.new_zeros(b, h + 2, w + 2, k, channels)
    for t, (dy, dx) in enumerate(TAPS):
        padded[:, dy:dy + h, dx:dx + w] += grad_cols[..., t * channels:(t + 1) * channels]
    return padded[:, 1:h + 1, 1:w + 1].contiguous()


def as_member_matrices(t: torch.Tensor) -> torch.Tensor:
    """[B, H, W, K, J] -> a [K, B*H*W, J] view (member k's rows; no copy: a strided batch for cuBLAS)."""
    return t.view(-1, t.shape[3], t.shape[4]).transpose(0, 1)


class StackedConvFunction(torch.autograd.Function):
    """y[b, h, w, k] = im2col(x)[b, h, w, k] @ [weight_k; bias_k; 0] for x [B, H, W, K, C], weight [K, 9C, O], bias [K, O]."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        b, h, w, k, c = x.shape
        out = weight.shape[2]
        cols = im2col(x)
        pad = cols.shape[4] - 9 * c - 1
        full = torch.cat([weight, bias.unsqueeze(1), weight.new_zeros(k, pad, out)], 1)  # [K, row_length, O]
        y = x.new_empty(b, h, w, k, out)
        torch.bmm(as_member_matrices(cols), full, out=as_member_matrices(y))
        ctx.save_for_backward(cols, full)
        ctx.channels = c
        return y

    @staticmethod
    def backward(ctx, grad_y):
        cols, full = ctx.saved_tensors
        c = ctx.channels
        grad_rows = as_member_matrices(grad_y.contiguous())  # [K, BHW, O]
        grad_full = torch.bmm(as_member_matrices(cols).transpose(1, 2), grad_rows)  # [K, row_length, O]
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_cols = torch.empty_like(cols)
            torch.bmm(grad_rows, full.transpose(1, 2), out=as_member_matrices(grad_cols))
            grad_x = col2im(grad_cols, c)
        return grad_x, grad_full[:, :9 * c], grad_full[:, 9 * c]


class StackedConv2d(nn.Module):
    """K Conv2d(C, O, 3, padding=1) as one module: [B, K*C, H, W] -> [B, K*O, H, W] (channels-last in memory)."""

    def __init__(self, convs: list[nn.Conv2d], function: type[torch.autograd.Function] = StackedConvFunction):
        super().__init__()
        self.function = function  # StackedConvFunction, or cookbook.fused_conv's (same arguments, no im2col)
        first = convs[0]
        if first.kernel_size != (3, 3) or first.padding != (1, 1) or first.stride != (1, 1) or first.groups != 1:
            raise ValueError(f"StackedConv2d takes 3x3, stride 1, padding 1 convs, not {first}")
        # weight[k, t*C + c, o] = conv_k.weight[o, c, dy, dx]: the order im2col writes a row in
        self.weight = nn.Parameter(torch.stack([m.weight.detach().permute(2, 3, 1, 0).reshape(-1, first.out_channels)
                                                for m in convs]))
        self.bias = nn.Parameter(torch.stack([m.bias.detach() for m in convs]))  # [K, O]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        k, out = self.weight.shape[0], self.weight.shape[2]
        weight, bias = self.weight, self.bias
        device = x.device.type
        if torch.is_autocast_enabled(device):  # autocast does not reach inside a custom Function: cast here, as conv2d would
            dtype = torch.get_autocast_dtype(device)
            x, weight, bias = x.to(dtype), weight.to(dtype), bias.to(dtype)
        nhwc = x.permute(0, 2, 3, 1).contiguous().view(b, h, w, k, -1)  # a view when x is channels-last
        with torch.autocast(device, enabled=False):
            y = self.function.apply(nhwc, weight, bias)
        return y.view(b, h, w, k * out).permute(0, 3, 1, 2)  # channels-last [B, K*O, H, W]
