"""The bundled default model for ``monoquant quantize --demo``: a small seeded transformer.

Plain PyTorch (no Hugging Face): token + position embeddings, pre-norm blocks with causal
self-attention (separate q/k/v/o ``nn.Linear``) and a GELU MLP, a final LayerNorm and an
untied ``lm_head``. Weights are drawn from a fixed seed, so every machine builds the same model.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["MLP", "Attention", "TinyTransformer", "TransformerBlock", "demo_inputs", "demo_model"]


class Attention(nn.Module):
    """Multi-head causal self-attention with separate q/k/v/o projections."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj = nn.Linear(dim, dim)
        self.k_proj = nn.Linear(dim, dim)
        self.v_proj = nn.Linear(dim, dim)
        self.o_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape

        def split(y: torch.Tensor) -> torch.Tensor:
            return y.view(b, t, self.heads, d // self.heads).transpose(1, 2)

        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, d))


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(ln1(x))`` then ``x + mlp(ln2(x))``."""

    def __init__(self, dim: int = 64, heads: int = 4, hidden: int = 256):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads)
        self.ln2 = nn.LayerNorm(dim)
        self.mlp = MLP(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A GPT-style language model small enough to quantize in well under a second."""

    def __init__(
        self,
        vocab: int = 2048,
        dim: int = 256,
        depth: int = 4,
        heads: int = 4,
        hidden: int = 1024,
        max_len: int = 128,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Embedding(max_len, dim)
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(depth))
        self.ln_f = nn.LayerNorm(dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        pos = torch.arange(tokens.shape[1], device=tokens.device)
        x = self.embed(tokens) + self.pos(pos)
        for block in self.blocks:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def demo_model(seed: int = 0) -> TinyTransformer:
    """The bundled demo model: GPT-2-style init (N(0, 0.02), scaled residual projections)."""
    g = torch.Generator().manual_seed(seed)
    model = TinyTransformer()
    depth = len(model.blocks)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1:
                if name.endswith("bias"):
                    p.normal_(0.0, 0.01, generator=g)
                else:
                    p.normal_(1.0, 0.05, generator=g)
                continue
            std = (
                0.02 / math.sqrt(2 * depth)
                if name.endswith(("o_proj.weight", "fc2.weight"))
                else 0.02
            )
            p.normal_(0.0, std, generator=g)
    return model.eval()


def demo_inputs(seed: int = 1, batch: int = 4, length: int = 32) -> torch.Tensor:
    """Sample token ids for the demo model."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2048, (batch, length), generator=g)
