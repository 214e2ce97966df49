"""embedding replacer: opt-in, row gather equals a lookup in the dequantized table exactly."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import monoquant_core as mq
from monoquant_core import UsageError


class TokenModel(nn.Module):
    def __init__(self, seed: int = 0, vocab: int = 100, dim: int = 64, tied: bool = False):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab, dim, padding_idx=0)
        self.head = nn.Linear(dim, vocab, bias=False)
        if tied:
            self.head.weight = self.embed.weight
        self.eval()

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(tokens))


SCHEMES = {
    "int8": ("int8", {}),
    "int8-asym": ("int8", {"symmetric": False}),
    "int8-per-tensor": ("int8", {"granularity": "per-tensor"}),
    "int4-g32": ("int4-group", {"group_size": 32}),
    "fp16": ("fp16", {}),
    "bf16": ("bf16", {}),
}


def _quantized_embedding(engine, emb, case="int8"):
    scheme, opts = SCHEMES[case]
    model = nn.Sequential(emb)
    qmodel, report = engine.quantize(model, scheme=scheme, scheme_options=opts, only=["0"])
    return qmodel[0], report


def test_embeddings_are_opt_in(engine):
    plan = engine.plan(TokenModel())
    reason = plan.get("embed").skip_reason
    assert reason and "opt-in" in reason and "--only 'embed'" in reason, reason
    assert plan.get("head").selected
    plan = engine.plan(TokenModel(), only=["embed"])
    assert plan.get("embed").selected and plan.get("embed").replacer == "embedding"
    assert "not matched" in plan.get("head").skip_reason


@pytest.mark.parametrize("case", sorted(SCHEMES))
def test_lookup_equals_dequantized_table_exactly(engine, case):
    emb = nn.Embedding(50, 70, padding_idx=3)
    q, _ = _quantized_embedding(engine, emb, case)
    assert type(q).__name__ == "QuantizedEmbedding"
    table = q.scheme.dequantize(q.qtensor("weight"))
    assert table.shape == (50, 70)
    for idx in (
        torch.tensor([3, 0, 49, 7, 7]),
        torch.randint(0, 50, (4, 9)),
        torch.randint(0, 50, (2, 3, 5), dtype=torch.int32),
        torch.tensor(11),
    ):
        y = q(idx)
        want = F.embedding(idx, table, padding_idx=3)
        assert y.shape == (*idx.shape, 70) and y.dtype == torch.float32
        assert torch.equal(y, want), f"{case}: max diff {(y - want).abs().max().item()}"


def test_lookup_never_dequantizes_the_whole_table(engine, monkeypatch):
    q, _ = _quantized_embedding(engine, nn.Embedding(1000, 32))
    sizes = []
    orig = q.scheme.dequantize

    def spy(qt):
        sizes.append(qt.shape)
        return orig(qt)

    monkeypatch.setattr(q.scheme, "dequantize", spy)
    q(torch.tensor([[1, 2, 3], [4, 5, 6]]))
    assert sizes == [(6, 32)], sizes


def test_int8_per_row_sqnr_on_gaussian_tables(engine):
    emb = nn.Embedding(512, 256)
    with torch.no_grad():
        emb.weight.mul_(torch.logspace(-2, 0, 512).unsqueeze(1))  # rows of very different scale
    w = emb.weight.detach().clone()
    q, report = _quantized_embedding(engine, emb)
    qt = q.qtensor("weight")
    assert qt.axis == 0 and qt.scale.shape == (512, 1)
    db = mq.sqnr_db(w, q.scheme.dequantize(qt))
    assert db > 40.0, f"int8 per-row embedding SQNR {db:.2f} dB"
    assert report.layer("0.weight").sqnr_db == pytest.approx(db)
    worst = min(mq.sqnr_db(w[i], q(torch.tensor([i]))[0]) for i in range(0, 512, 37))
    assert worst > 40.0, f"worst sampled row SQNR {worst:.2f} dB"


def test_save_load_bit_identical(tmp_path, engine):
    tokens = torch.randint(0, 100, (3, 12))
    model = TokenModel(seed=2)
    with torch.no_grad():
        ref = model(tokens)
        qmodel, _ = engine.quantize(
            model, scheme="int8", only=["embed", "head"], backend="reference"
        )
        y = qmodel(tokens)
    assert type(qmodel.embed).__name__ == "QuantizedEmbedding"
    db = mq.sqnr_db(ref, y)
    assert db > 35.0, f"token model output SQNR {db:.2f} dB"
    path = tmp_path / "tok.safetensors"
    mq.save(qmodel, str(path))
    restored = mq.load(str(path), TokenModel(seed=5), backend="reference")
    assert restored.embed.padding_idx == 0
    with torch.no_grad():
        y2 = restored(tokens)
    assert torch.equal(y, y2), f"max diff {(y - y2).abs().max().item()}"
    plain = TokenModel(seed=5)
    plain.load_state_dict(mq.load(str(path), dequantize=True), strict=True)
    with torch.no_grad():
        y3 = plain(tokens)
    assert torch.allclose(y3, y, atol=1e-5), f"max diff {(y3 - y).abs().max().item()}"


def test_tied_weights_still_plan(engine):
    model = TokenModel(tied=True)
    plan = engine.plan(model)
    assert "opt-in" in plan.get("embed").skip_reason
    assert "tied to 'embed.weight'" in plan.get("head").skip_reason, plan.get("head").skip_reason
    plan = engine.plan(model, only=["embed", "head"])
    assert "tied to 'head.weight'" in plan.get("embed").skip_reason, plan.get("embed").skip_reason
    with pytest.raises(UsageError, match="kept in float: 'embed' \\(weight is tied to 'head"):
        engine.quantize(model, only=["embed", "head"])
    assert model.head.weight is model.embed.weight


def test_max_norm_is_refused_at_plan_time(engine):
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0))
    reason = engine.plan(model, only=["0"]).get("0").skip_reason
    assert reason and "max_norm=1.0" in reason, reason


def test_keeps_attributes_dtype_and_repr(engine):
    emb = nn.Embedding(20, 8, padding_idx=-1, scale_grad_by_freq=True).to(torch.bfloat16)
    q, _ = _quantized_embedding(engine, emb)
    assert (q.num_embeddings, q.embedding_dim, q.padding_idx) == (20, 8, 19)
    assert q.scale_grad_by_freq and not q.sparse and q.max_norm is None
    assert q(torch.tensor([1, 2])).dtype == torch.bfloat16
    empty = q(torch.zeros(2, 0, dtype=torch.long))
    assert empty.shape == (2, 0, 8) and empty.dtype == torch.bfloat16
    text = repr(q)
    assert "20, 8, padding_idx=19" in text and "scheme=int8" in text, text
    with pytest.raises(IndexError):
        q(torch.tensor([20]))
