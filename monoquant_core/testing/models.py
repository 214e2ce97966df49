"""Small seeded models used by the tests (and usable by plugin authors' tests).

Every builder takes a ``seed`` and returns a fresh model in eval mode, so a test can build the
same float model twice (once to quantize, once to load a saved file into).
:func:`tiny_models` bundles them with example inputs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise

import torch
from torch import nn

from ..demo import TransformerBlock

__all__ = [
    "ActivationTransformer",
    "ConvNet",
    "CustomWrapperModel",
    "EmbeddingModel",
    "TinyModel",
    "activation_batches",
    "activation_transformer",
    "conv_net",
    "correlated_batches",
    "embedding_model",
    "mlp",
    "odd_inputs",
    "outlier_mlp",
    "tiny_models",
    "transformer_block",
]


def mlp(seed: int = 0, dims: tuple[int, ...] = (32, 64, 64, 10)) -> nn.Sequential:
    """``Linear -> ReLU -> ... -> Linear`` with seeded weights."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(pairwise(dims)):
        layers.append(nn.Linear(a, b))
        if i < len(dims) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).eval()


def outlier_mlp(seed: int = 0, factor: float = 30.0) -> nn.Sequential:
    """:func:`mlp` whose Linear weights each have two input columns ``factor`` times larger.

    Outlier input channels stretch every row's range, which is what separates per-channel
    from group-wise schemes and clipping observers from plain min/max.
    """
    model = mlp(seed)
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight[:, :2] *= factor
    return model


def transformer_block(seed: int = 0, dim: int = 64, heads: int = 4, hidden: int = 256) -> nn.Module:
    """One pre-norm transformer block: attention (q/k/v/o Linear) + GELU MLP + two LayerNorms."""
    torch.manual_seed(seed)
    return TransformerBlock(dim, heads, hidden).eval()


#: hidden dimensions given outlier activations, and how many times the typical magnitude
OUTLIER_CHANNELS = ((7, 20.0), (123, 50.0), (301, 100.0))


class ActivationTransformer(nn.Module):
    """A stack of pre-norm transformer blocks on hidden states ``[B, T, dim]``.

    With ``outliers=True`` a few hidden dimensions (:data:`OUTLIER_CHANNELS`: 20x, 50x and
    100x) of every LayerNorm output are scaled up, as observed in LLMs, so the q/k/v and fc1
    layers see activation outlier channels; the weights are the same either way.
    """

    def __init__(self, dim: int, heads: int, hidden: int, depth: int) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(TransformerBlock(dim, heads, hidden) for _ in range(depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


def activation_transformer(
    seed: int = 0,
    outliers: bool = False,
    dim: int = 384,
    heads: int = 6,
    hidden: int = 768,
    depth: int = 2,
) -> ActivationTransformer:
    """The activation-quantization benchmark model (``bench/activations.py``); see
    :class:`ActivationTransformer`. 3 outlier channels of 384 = 0.78% of the input columns."""
    torch.manual_seed(seed)
    model = ActivationTransformer(dim, heads, hidden, depth)
    if outliers:
        with torch.no_grad():
            for block in model.blocks:
                for ln in (block.ln1, block.ln2):
                    for ch, factor in OUTLIER_CHANNELS:
                        if ch < dim:
                            ln.weight[ch] *= factor
    return model.eval()


def activation_batches(
    n: int = 16, batch: int = 4, tokens: int = 32, dim: int = 384, seed: int = 0, df: int = 5
) -> list[torch.Tensor]:
    """``n`` seeded batches ``[batch, tokens, dim]`` of heavy-tailed (Student-t, ``df``
    degrees of freedom) hidden states: inputs of :func:`activation_transformer`."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = torch.randn(batch, tokens, dim, generator=g)
        chi = torch.randn(df, batch, tokens, dim, generator=g).square().sum(0) / df
        out.append(z / chi.sqrt())
    return out


def correlated_batches(
    n: int, dim: int = 384, seed: int = 0, batch: int = 4, tokens: int = 32
) -> list[torch.Tensor]:
    """``n`` batches ``[batch, tokens, dim]`` of correlated, heavy-tailed hidden states: the
    same rotation and spectrum for every seed (so seed 0 can calibrate and seed 1 evaluate),
    the kind of input whose Hessian GPTQ exploits."""
    g = torch.Generator().manual_seed(1234)
    rot, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))
    mix = rot * torch.logspace(0, -1.5, dim).unsqueeze(0)
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        z = torch.randn(batch, tokens, dim, generator=g)
        chi = torch.randn(5, batch, tokens, dim, generator=g).square().mean(0)
        out.append((z / chi.sqrt()) @ mix.T * 4.0)
    return out


class ConvNet(nn.Module):
    """Conv2d -> ReLU -> strided Conv2d -> Conv1d over the flattened pixels -> Linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1)
        self.conv3 = nn.Conv1d(32, 32, 3, padding=1)
        self.head = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv2(torch.relu(self.conv1(x)))
        h = self.conv3(h.flatten(2))
        return self.head(h.mean(-1))


def conv_net(seed: int = 0) -> ConvNet:
    """A small CNN with Conv2d and Conv1d layers (inputs ``[B, 3, H, W]``)."""
    torch.manual_seed(seed)
    return ConvNet().eval()


class EmbeddingModel(nn.Module):
    """Token embedding -> mean over the sequence -> Linear head (inputs: token ids)."""

    def __init__(self, vocab: int = 100, dim: int = 64) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.head = nn.Linear(dim, 10)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens).mean(1))


def embedding_model(seed: int = 0) -> EmbeddingModel:
    """An embedding table plus a head; embeddings are opt-in, so select them with ``only``."""
    torch.manual_seed(seed)
    return EmbeddingModel().eval()


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


@dataclass(frozen=True)
class TinyModel:
    """A seeded model factory with an example input.

    Attributes:
        name: the key in :func:`tiny_models`.
        build: returns a fresh float model (same weights on every call).
        inputs: an example input for ``model(inputs)``.
        only: ``only`` patterns that select every quantizable layer (opt-in layers such as
            embeddings included); empty means the default selection.
    """

    name: str
    build: Callable[[], nn.Module]
    inputs: torch.Tensor
    only: tuple[str, ...] = field(default=())


def tiny_models(seed: int = 0) -> dict[str, TinyModel]:
    """Every tiny model by name: ``mlp``, ``outliers``, ``conv``, ``embedding``,
    ``transformer`` and ``wrapper`` (Linear layers inside a custom module)."""
    g = torch.Generator().manual_seed(seed + 1)
    return {
        m.name: m
        for m in (
            TinyModel("mlp", lambda: mlp(seed), torch.randn(4, 32, generator=g)),
            TinyModel("outliers", lambda: outlier_mlp(seed), torch.randn(4, 32, generator=g)),
            TinyModel("conv", lambda: conv_net(seed), torch.randn(2, 3, 8, 8, generator=g)),
            TinyModel(
                "embedding",
                lambda: embedding_model(seed),
                torch.randint(0, 100, (3, 7), generator=g),
                only=("*",),
            ),
            TinyModel(
                "transformer", lambda: transformer_block(seed), torch.randn(2, 5, 64, generator=g)
            ),
            TinyModel("wrapper", lambda: CustomWrapperModel(seed), torch.randn(3, 16, generator=g)),
        )
    }


def odd_inputs(
    k: int, device: str | torch.device = "cpu", seed: int = 0
) -> dict[str, torch.Tensor]:
    """Inputs of width ``k`` that fused kernels get wrong most often, by label.

    A non-contiguous view, a view whose data pointer is misaligned (offset by one element),
    the same in bfloat16, float16, a 3-D batch, all-zero rows, an empty batch and an empty
    3-D batch. A backend must return the reference backend's result (within its declared
    numerics) or fall back, never crash; :class:`BackendContract` checks that.
    """
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    return {
        "non-contiguous": randn(5, 2 * k)[:, ::2],
        "misaligned": randn(5 * k + 1)[1:].view(5, k),
        "misaligned bfloat16": randn(5 * k + 1).to(torch.bfloat16)[1:].view(5, k),
        "float16": randn(5, k).to(torch.float16),
        "3-D": randn(2, 3, k),
        "zero rows": torch.zeros(3, k, device=device),
        "empty batch": torch.zeros(0, k, device=device),
        "empty 3-D": torch.zeros(2, 0, k, device=device),
    }
