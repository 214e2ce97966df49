"""The model and the run behind ``format_v1.safetensors``: a file saved by Mono Quant before
the core redesign (commit 064dbac), kept so that every later version proves it loads old files
bit-identically (tests/core/test_format_fixture.py).

Regenerate (only when the on-disk format version changes, never to make a test pass)::

    python tests/data/format_v1_fixture.py
"""

from __future__ import annotations

import os

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
FILE = os.path.join(HERE, "format_v1.safetensors")
EXPECTED = os.path.join(HERE, "format_v1_expected.safetensors")

#: mixed precision by rule: every built-in scheme and layout in one file
RULES = [
    "embed=int4-group,group_size=32",
    "b=int8,granularity=per-tensor,symmetric=false",
    "c=int4-group,group_size=32",
    "d=fp16",
    "e=int8,activations=dynamic",
    "f=int8,activations=static",
    "g=bf16",
]
#: LLM.int8()-style float columns on ``e`` (int8 dynamic)
OUTLIER = {"threshold": 1.0, "max_fraction": 0.05}


class FixtureNet(nn.Module):
    """Embedding -> Conv1d -> seven Linear layers, seeded."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(50, 32)
        self.conv = nn.Conv1d(32, 32, 3, padding=1)
        self.a = nn.Linear(32, 64)
        self.b = nn.Linear(64, 64)
        self.c = nn.Linear(64, 128)
        self.d = nn.Linear(128, 64)
        self.e = nn.Linear(64, 64)
        self.f = nn.Linear(64, 32)
        self.g = nn.Linear(32, 16)
        with torch.no_grad():
            self.embed.weight[:, :2] *= 20.0  # outlier features for the outlier plugin
        self.eval()

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids)
        x = x + self.conv(x.transpose(1, 2)).transpose(1, 2)
        x = torch.relu(self.a(x))
        x = torch.relu(self.b(x))
        x = torch.relu(self.c(x))
        x = self.d(x)
        x = torch.relu(self.e(x))
        x = torch.relu(self.f(x))
        return self.g(x)


def inputs(seed: int = 1, batches: int = 4) -> list[torch.Tensor]:
    """Token-id batches ``[2, 8]`` (calibration data, and the test's inputs)."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 50, (2, 8), generator=gen) for _ in range(batches)]


def main() -> None:  # pragma: no cover - run by hand, see the module docstring
    from monoquant_plugins.safetensors_format import write_safetensors

    from monoquant_core import Engine, load

    engine = Engine()
    model, _ = engine.quantize(
        FixtureNet(),
        scheme="int8",
        rules=RULES,
        calibration=inputs(),
        min_rows=1,
        plugin_options={"outlier": dict(OUTLIER)},
        progress=False,
    )
    engine.save(model, FILE)
    state = load(FILE, dequantize=True)
    write_safetensors(EXPECTED, {k: v.contiguous() for k, v in state.items()}, {})


if __name__ == "__main__":  # pragma: no cover
    main()
