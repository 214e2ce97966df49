"""gptq_hessian.py: the Hessian collectors (Linear: ``2 X^T X / rows``; convolutions: the
im2col form that reproduces the output energy of any weight change)."""

from __future__ import annotations

import math

import pytest
import torch
from monoquant_plugins.gptq_hessian import HessianCollector
from torch import nn

pytestmark = pytest.mark.usefixtures("single_thread")


# --------------------------------------------------------------------------- collectors


def test_linear_collector_is_2xtx_over_rows():
    col = HessianCollector(16)
    xs = [torch.randn(3, 5, 16), torch.randn(7, 16)]
    for x in xs:
        col.update(x)
    flat = torch.cat([x.reshape(-1, 16) for x in xs])
    assert col.rows == 22
    torch.testing.assert_close(col.hessian(), 2 * flat.T @ flat / 22)


def test_collector_drops_nonfinite_rows():
    col = HessianCollector(8)
    x = torch.randn(10, 8)
    x[3, 2] = float("nan")
    x[5, 0] = float("inf")
    col.update(x)
    assert col.rows == 8 and col.nonfinite == 2
    assert torch.isfinite(col.hessian()).all()


CONVS = [
    nn.Conv2d(3, 8, 3, padding=1),
    nn.Conv2d(4, 6, (3, 2), stride=2, dilation=(1, 2), padding=(2, 1)),
    nn.Conv2d(4, 8, 3, padding="same", padding_mode="reflect"),
    nn.Conv2d(4, 8, 3, groups=2, padding="same"),
    nn.Conv2d(4, 4, 4, padding="same"),
    nn.Conv2d(4, 8, 3, padding=1, padding_mode="circular"),
    nn.Conv1d(4, 6, 3, stride=2, padding=1),
    nn.Conv1d(4, 6, 4, padding="same", padding_mode="replicate"),
    nn.Conv1d(6, 6, 3, groups=3, dilation=2, padding="valid"),
]


@pytest.mark.parametrize("conv", CONVS, ids=lambda m: repr(m))
def test_conv_hessian_reproduces_output_energy(conv):
    """For any weight change dW: ||conv(x, dW)||^2 = rows/2 * sum_r dW_r H dW_r^T."""
    two_d = isinstance(conv, nn.Conv2d)
    x = torch.randn(2, conv.in_channels, *((9, 11) if two_d else (13,)))
    col = HessianCollector(math.prod(conv.weight.shape[1:]), "conv2d" if two_d else "conv1d", conv)
    col.update(x)
    dw = torch.randn_like(conv.weight)
    with torch.no_grad():
        conv.weight.copy_(dw)
        conv.bias.zero_()
        energy = conv(x).square().sum()
    h = col.hessian()
    h = h if h.dim() == 3 else h.unsqueeze(0)
    rows = dw.reshape(h.shape[0], -1, h.shape[-1])
    quad = torch.einsum("gck,gkl,gcl->", rows, h, rows) * col.rows / 2
    torch.testing.assert_close(quad, energy, rtol=1e-4, atol=1e-3)
