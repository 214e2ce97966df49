"""Every built-in scheme x every built-in replacer: save -> load is bit-identical."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import monoquant_core as mq


class Conv1D(nn.Module):
    """A GPT-2 style Conv1D (weight [in, out]), found by its qualified class name."""

    def __init__(self, nf: int, nx: int):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nf))

    def forward(self, x):
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


class AllLayers(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(100, 48)
        self.conv1d = nn.Conv1d(48, 40, 3, padding=1)
        self.conv2d = nn.Conv2d(48, 6, 1)
        self.gpt2 = Conv1D(64, 40)
        self.head = nn.Linear(64 + 6 * 4, 10)

    def forward(self, tokens):
        x = self.embed(tokens)  # [B, T, 48]
        h = self.conv1d(x.transpose(1, 2)).transpose(1, 2).contiguous()  # [B, T, 40]
        h = self.gpt2(h).mean(1)  # [B, 64]
        img = self.conv2d(x.transpose(1, 2).unsqueeze(-1)).flatten(2).mean(-1)  # [B, 6]
        return self.head(torch.cat([h, img.repeat(1, 4)], dim=-1))


SCHEMES = [
    ("int8", {}),
    ("int8", {"granularity": "per-tensor"}),
    ("int8", {"symmetric": False}),
    ("int4-group", {"group_size": 32}),
    ("int4-group", {"group_size": 32, "symmetric": True}),
    ("int4-group", {"group_size": 64, "zero": "int", "method": "rtn"}),
    ("fp16", {}),
    ("bf16", {}),
]


@pytest.mark.parametrize("scheme, opts", SCHEMES)
def test_every_scheme_and_replacer_round_trips(tmp_path, engine, scheme, opts):
    tokens = torch.randint(0, 100, (3, 8))
    rules = []
    if scheme == "int8" and opts.get("granularity") == "per-tensor":
        rules = ["embed=int8"]  # per-tensor tables gather rows only for unpacked codes
    model, report = engine.quantize(
        AllLayers(), scheme=scheme, scheme_options=opts, only=["*"], rules=rules
    )
    replaced = {type(m).__name__ for m in model.modules()}
    assert {
        "QuantizedLinear",
        "QuantizedConv1d",
        "QuantizedConv2d",
        "QuantizedEmbedding",
        "QuantizedGPT2Conv1D",
    } <= replaced, replaced
    assert len(report.layers) == 5
    with torch.no_grad():
        y = model(tokens)
        ref = AllLayers()(tokens)
    assert mq.sqnr_db(ref, y) > 15, mq.sqnr_db(ref, y)
    path = tmp_path / "all.safetensors"
    mq.save(model, str(path))
    back = mq.load(str(path), AllLayers(seed=1))
    with torch.no_grad():
        assert torch.equal(back(tokens), y)
    plain = AllLayers(seed=2)
    plain.load_state_dict(mq.load(str(path), dequantize=True), strict=True)
