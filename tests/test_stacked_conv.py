"""The gemm stacked convolution: the same sums as K separate convolutions, forward and backward."""
import pytest
import torch
from torch import nn

from cookbook.stacked_conv import StackedConv2d, StackedConvFunction, col2im, im2col, row_length


def test_rows_are_aligned_and_hold_every_tap_and_the_bias_column():
    assert [row_length(c) for c in (1, 32, 64)] == [16, 296, 584]
    x = torch.arange(2 * 3 * 3 * 2 * 1, dtype=torch.float64).view(2, 3, 3, 2, 1) + 1
    cols = im2col(x)
    centre = cols[:, 1, 1]  # the middle pixel sees its whole 3x3 neighbourhood
    assert torch.equal(centre[..., :9], x[:, :, :, :, 0].permute(0, 3, 1, 2).reshape(2, 2, 9))
    assert torch.equal(cols[..., 9], torch.ones(2, 3, 3, 2, dtype=torch.float64))
    assert not cols[..., 10:].any() and not cols[:, 0, 0, :, :4].any()  # padding columns; the corner's outside taps


def test_col2im_is_the_adjoint_of_im2col():
    torch.manual_seed(0)
    x, g = torch.randn(2, 5, 4, 3, 2, dtype=torch.float64), torch.randn(2, 5, 4, 3, row_length(2), dtype=torch.float64)
    g[..., 18:] = 0  # the bias and padding columns are not x's
    assert (im2col(x) * g).sum().item() == pytest.approx((x * col2im(g, 2)).sum().item(), rel=1e-12)


def test_function_gradients_match_finite_differences():
    torch.manual_seed(0)
    args = [torch.randn(2, 4, 3, 2, 3, dtype=torch.float64, requires_grad=True),
            torch.randn(2, 27, 5, dtype=torch.float64, requires_grad=True), torch.randn(2, 5, dtype=torch.float64, requires_grad=True)]
    assert torch.autograd.gradcheck(StackedConvFunction.apply, args)


def test_stacked_conv_is_each_members_conv2d():
    torch.manual_seed(0)
    convs = [nn.Conv2d(3, 4, 3, padding=1).double() for _ in range(3)]
    layer = StackedConv2d(convs)
    x = torch.randn(2, 9, 6, 5, dtype=torch.float64)
    y = layer(x.contiguous(memory_format=torch.channels_last))
    want = torch.cat([conv(x[:, 3 * k:3 * k + 3]) for k, conv in enumerate(convs)], 1)
    torch.testing.assert_close(y, want)
    assert y.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError, match="3x3, stride 1, padding 1"):
        StackedConv2d([nn.Conv2d(3, 4, 5, padding=2)])
