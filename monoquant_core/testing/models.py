"""Small seeded models used by the tests (and usable by plugin authors' tests)."""

from __future__ import annotations

from itertools import pairwise

import torch
from torch import nn

from ..demo import TransformerBlock

__all__ = ["CustomWrapperModel", "mlp", "transformer_block"]


def mlp(seed: int = 0, dims: tuple[int, ...] = (32, 64, 64, 10)) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with seeded weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def transformer_block(seed: int = 0, dim: int = 64, heads: int = 4, hidden: int = 256) -> nn.Module:
    """One pre-norm transformer block: attention (q/k/v/o Linear) + GELU MLP + two LayerNorms."""
    torch.manual_seed(seed)
    return TransformerBlock(dim, heads, hidden).eval()


class GatedLinear(nn.Module):
    """A custom module that wraps two Linear layers and owns a parameter of its own."""

    def __init__(self, dim: int):
        super().__init__()
        self.value = nn.Linear(dim, dim)
        self.gate = nn.Linear(dim, dim, bias=False)
        self.temperature = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.value(x) * torch.sigmoid(self.gate(x) * self.temperature)


class CustomWrapperModel(nn.Module):
    """A model whose Linear layers sit inside a custom module (found by type, not by name)."""

    def __init__(self, seed: int = 0, dim: int = 48):
        super().__init__()
        torch.manual_seed(seed)
        self.inp = nn.Linear(16, dim)
        self.body = nn.ModuleList(GatedLinear(dim) for _ in range(2))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, 4)
        self.eval()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.body:
            h = h + block(h)
        return self.out(self.norm(h))
