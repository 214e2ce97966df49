"""files.py: save -> load is bit-identical (every scheme x replacer), a file records what made
it, one rule chooses the serializer, and every bad file is a one-line FormatError."""

from __future__ import annotations

import json
import os

import pytest
import torch
from monoquant_plugins.safetensors_format import SafetensorsSerializer, write_safetensors
from safetensors import safe_open
from torch import nn

import monoquant_core as mq
from monoquant_core import Engine, FormatError, UsageError, hookimpl
from monoquant_core.files import serializer_for_read, serializer_for_write
from monoquant_core.testing import (
    CustomWrapperModel,
    make_fake_distribution,
    mlp,
    transformer_block,
)
from tests.helpers import (
    SCHEME_PLUGIN,
    Conv1D,
    edited_copy,
    returns_within,
    same_state,
    snapshot,
)


def test_metadata_records_format_scheme_and_producers(saved):
    path, _ = saved
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = set(f.keys())
    assert meta["format"] == "monoquant" and meta["format_version"] == "1"
    quant = json.loads(meta["quantization"])
    assert set(quant) == {"0.weight", "2.weight", "4.weight"}
    info = quant["0.weight"]
    assert info["scheme"] == "int8" and info["bits"] == 8 and info["shape"] == [64, 32]
    assert info["plugin"] == "int8" and info["layout"] == "affine"
    assert info["scheme_config"] == {
        "version": 1,
        "granularity": "per-channel",
        "symmetric": True,
        "activations": "none",
    }
    producers = json.loads(meta["producers"])
    assert producers["int8"]["distribution"] == "monoquant"
    assert {"0.weight.qdata", "0.weight.scale", "0.bias"} <= keys
    assert "0.weight" not in keys


def test_not_a_safetensors_file(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(b"PK\x03\x04 this is a zip file, not safetensors")
    with pytest.raises(FormatError, match="not in a format any installed serializer reads"):
        mq.load(str(bad), mlp())
    with pytest.raises(UsageError, match="does not exist"):
        mq.load(str(tmp_path / "nope.safetensors"), mlp())


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
def test_truncated_file(tmp_path, saved, keep):
    path, _ = saved
    data = path.read_bytes()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(FormatError) as e:
        mq.load(str(cut), mlp())
    assert "\n" not in str(e.value)


def test_newer_format_version_is_refused(tmp_path, saved):
    path, _ = saved
    out = edited_copy(
        path, tmp_path / "v3.safetensors", edit_meta=lambda m: m.update(format_version="3")
    )
    with pytest.raises(FormatError, match="format version 3 by a newer Mono Quant.*pip install -U"):
        mq.load(str(out), mlp())


def test_inconsistent_quantization_metadata(tmp_path, saved):
    path, _ = saved

    def lie(meta):
        q = json.loads(meta["quantization"])
        q["0.weight"]["shape"] = [64, 31]
        meta["quantization"] = json.dumps(q)

    out = edited_copy(path, tmp_path / "lie.safetensors", edit_meta=lie)
    with pytest.raises(FormatError, match="'0.weight' is inconsistent"):
        mq.load(str(out), mlp())

    def drop(tensors):
        del tensors["2.weight.scale"]

    out2 = edited_copy(path, tmp_path / "drop.safetensors", edit_tensors=drop)
    with pytest.raises(FormatError, match="lacks its 'scale' data"):
        mq.load(str(out2), mlp())
    out3 = edited_copy(
        path, tmp_path / "json.safetensors", edit_meta=lambda m: m.update(quantization="{not json")
    )
    with pytest.raises(FormatError, match="not valid JSON"):
        mq.load(str(out3), mlp())


def test_wrong_model_is_refused_and_left_untouched(saved):
    path, _ = saved
    other = mlp(dims=(32, 64, 64, 11))
    before = snapshot(other)
    with pytest.raises(FormatError, match="4.weight has shape"):
        mq.load(str(path), other)
    assert same_state(before, other)
    deeper = mlp(dims=(32, 64, 64, 10, 10))
    with pytest.raises(
        FormatError, match=r"does not match the model: missing \[.6.bias., .6.weight.\]"
    ):
        mq.load(str(path), deeper)


def test_load_needs_a_model_or_dequantize(saved):
    path, _ = saved
    with pytest.raises(UsageError, match="dequantize=True"):
        mq.load(str(path))


def test_missing_scheme_plugin_is_named(tmp_path, monkeypatch):
    root = make_fake_distribution(
        tmp_path / "d",
        "monoquant-round8",
        "1.2.3",
        {"round8": "mq_round8"},
        {"mq_round8": SCHEME_PLUGIN},
    )
    monkeypatch.syspath_prepend(str(root))
    engine = Engine()
    qmodel, _ = engine.quantize(mlp(), scheme="round8")
    path = tmp_path / "r8.safetensors"
    engine.save(qmodel, str(path))
    without = Engine(disable=["monoquant-round8"])
    with pytest.raises(FormatError) as e:
        mq.load(str(path), mlp(), engine=without)
    msg = str(e.value)
    assert "scheme 'round8' from plugin 'round8' (monoquant-round8 1.2.3)" in msg
    assert "pip install monoquant-round8" in msg
    # The scheme uses the standard affine layout, so dequantize works without the plugin.
    state = mq.load(str(path), dequantize=True, engine=without)
    mlp().load_state_dict(state, strict=True)


def test_plain_float_safetensors_loads(tmp_path):
    model = mlp()
    path = tmp_path / "float.safetensors"
    write_safetensors(str(path), model.state_dict(), {"format": "pt"})
    fresh = mq.load(str(path), mlp(seed=5))
    x = torch.randn(2, 32)
    assert torch.equal(fresh(x), model(x))


def test_tied_and_non_contiguous_tensors_save(tmp_path, engine):
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = torch.nn.Embedding(10, 8)
            self.head = torch.nn.Linear(8, 10, bias=False)
            self.head.weight = self.emb.weight
            self.fc = torch.nn.Linear(8, 8)
            self.register_buffer("view", torch.arange(16.0).reshape(4, 4).t())

        def forward(self, t):
            return self.head(self.fc(self.emb(t)))

    q, _ = engine.quantize(Tied())
    path = tmp_path / "tied.safetensors"
    mq.save(q, str(path))
    t = torch.tensor([[1, 2, 3]])
    assert torch.equal(mq.load(str(path), Tied())(t), q(t))


# --------------------------------------------------------------------------- round trips

MODELS = {
    "mlp": (lambda: mlp(seed=1), lambda: torch.randn(5, 32)),
    "transformer_block": (lambda: transformer_block(seed=2), lambda: torch.randn(2, 7, 64)),
    "custom_wrapper": (lambda: CustomWrapperModel(seed=3), lambda: torch.randn(6, 16)),
}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("opts", [{}, {"granularity": "per-tensor"}, {"symmetric": False}])
def test_save_load_is_bit_identical(tmp_path, engine, name, opts):
    build, inputs = MODELS[name]
    x = inputs()
    model = build()
    with torch.no_grad():
        ref = model(x)
        qmodel, report = engine.quantize(
            model, scheme="int8", scheme_options=opts, backend="reference"
        )
        y = qmodel(x)
    assert report.layers, "nothing was quantized"
    assert mq.sqnr_db(ref, y) > 25.0
    path = tmp_path / f"{name}.safetensors"
    engine.save(qmodel, str(path))
    restored = mq.load(str(path), build(), backend="reference")
    with torch.no_grad():
        y2 = restored(x)
    assert torch.equal(y, y2), f"max diff {(y - y2).abs().max().item()}"

    state = mq.load(str(path), dequantize=True)
    plain = build()
    plain.load_state_dict(state, strict=True)
    with torch.no_grad():
        y3 = plain(x)
    assert mq.sqnr_db(ref, y3) > 25.0
    assert torch.allclose(y3, y, atol=1e-5)


class AllLayers(nn.Module):
    """One layer of every built-in replacer's type."""

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
    replaced = {name: type(m).__name__ for name, m in model.named_children()}
    assert replaced == {
        "embed": "QuantizedEmbedding",
        "conv1d": "QuantizedConv1d",
        "conv2d": "QuantizedConv2d",
        "gpt2": "QuantizedGPT2Conv1D",
        "head": "QuantizedLinear",
    }
    assert {layer.name for layer in report.layers} == {f"{n}.weight" for n in replaced}
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


# --------------------------------------------------------------------------- serializer choice


class OtherFormat(SafetensorsSerializer):
    name = "other"
    suffixes = (".other", ".safetensors")

    def sniff(self, path):
        return path.endswith(".other")


class OtherPlugin:
    @hookimpl
    def monoquant_register_serializers(self, register):
        register(OtherFormat())


def test_the_serializer_for_writing_is_named_or_chosen_by_suffix(tmp_path):
    engine = Engine(plugins=[OtherPlugin()])
    sers = engine.serializers
    assert serializer_for_write(sers, "m.bin", "other").name == "other"
    assert serializer_for_write(sers, "m.other").name == "other"
    # both claim .safetensors: the first by name wins, the same rule every time
    assert serializer_for_write(sers, "m.safetensors").name == "other"
    assert serializer_for_write(Engine().serializers, "m.safetensors").name == "safetensors"
    assert serializer_for_write(sers, "m.bin").name == "safetensors"  # the fallback
    with pytest.raises(UsageError, match="unknown serializer 'nope'"):
        serializer_for_write(sers, "m.bin", "nope")


def test_the_serializer_for_reading_is_the_one_that_sniffs_the_file(tmp_path, saved):
    path, _ = saved
    engine = Engine(plugins=[OtherPlugin()])
    assert serializer_for_read(engine.serializers, str(path)).name == "safetensors"
    other = tmp_path / "m.other"
    other.write_bytes(b"anything")
    assert serializer_for_read(engine.serializers, str(other)).name == "other"
    with pytest.raises(UsageError, match="is a directory, not a file"):
        serializer_for_read(engine.serializers, str(tmp_path))
    junk = tmp_path / "junk.bin"
    junk.write_bytes(b"junk")
    installed = r"\(installed: compressed-tensors, onnx, other, safetensors\)"
    with pytest.raises(FormatError, match=r"not in a format .* " + installed):
        serializer_for_read(engine.serializers, str(junk))


class OpeningFormat(OtherFormat):
    """A serializer whose ``sniff`` reads the file (and so would block on a FIFO)."""

    name = "opening"

    def sniff(self, path):
        with open(path, "rb") as f:
            return f.read(4) == b"OPEN"


class OpeningPlugin:
    @hookimpl
    def monoquant_register_serializers(self, register):
        register(OpeningFormat())


def test_no_serializer_sniffs_a_fifo(tmp_path):
    """A FIFO without a writer blocked every command (``inspect``, ``load``) forever: the core
    refuses a path that is not a regular file before any serializer opens it."""
    engine = Engine(plugins=[OpeningPlugin()])
    fifo = tmp_path / "m.other"
    os.mkfifo(fifo)
    with returns_within(5), pytest.raises(UsageError, match="is a FIFO, not a regular file"):
        serializer_for_read(engine.serializers, str(fifo))
    with returns_within(5), pytest.raises(UsageError, match="is a FIFO"):
        engine.load(str(fifo), dequantize=True)


# --------------------------------------------------------------------------- strict, buffers


class _WithPositionIds(nn.Module):
    """A Hugging Face-style model: ``position_ids`` is a non-persistent buffer."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(64, 32)
        self.norm = nn.LayerNorm(32)
        self.register_buffer("position_ids", torch.arange(16)[None], persistent=False)

    def forward(self, x):
        return self.norm(self.fc(x))


def _saved_with_extra(tmp_path, engine, extra: dict[str, torch.Tensor]):
    torch.manual_seed(0)
    model = _WithPositionIds()
    ref = _WithPositionIds()
    ref.load_state_dict(model.state_dict())
    q, _ = engine.quantize(model, scheme="int8")
    path = tmp_path / "m.safetensors"
    engine.save(q, str(path))
    edited_copy(path, path, edit_tensors=lambda t: t.update(extra))
    return path, ref


def test_a_non_persistent_buffer_in_the_file_is_not_an_unexpected_tensor(tmp_path, engine):
    """A Hugging Face checkpoint holding ``embeddings.position_ids`` failed with 'pass the
    same model architecture' although the architecture was the same."""
    path, ref = _saved_with_extra(tmp_path, engine, {"position_ids": torch.arange(16)[None]})
    model = engine.load(str(path), ref)
    assert isinstance(model.fc, mq.QuantizedModule)
    assert torch.equal(model.position_ids, torch.arange(16)[None])


def test_strict_false_allows_missing_and_extra_float_tensors_with_a_warning(tmp_path, engine):
    path, ref = _saved_with_extra(tmp_path, engine, {"head.bias": torch.zeros(3)})
    edited_copy(path, path, edit_tensors=lambda t: t.pop("norm.weight"))
    with pytest.raises(FormatError, match=r"missing \['norm.weight'\]; unexpected \['head.bias"):
        engine.load(str(path), _WithPositionIds())
    norm_before = ref.norm.weight.detach().clone()
    with pytest.warns(UserWarning) as record:
        model = mq.load(str(path), ref, strict=False, engine=engine)
    (w,) = record
    assert "missing from the file (the model keeps its values): norm.weight" in str(w.message)
    assert "in the file but not in the model (ignored): head.bias" in str(w.message)
    assert torch.equal(model.norm.weight, norm_before)
    assert isinstance(model.fc, mq.QuantizedModule)


def test_strict_false_still_refuses_wrong_shapes(tmp_path, engine):
    path, _ = _saved_with_extra(tmp_path, engine, {})
    edited_copy(path, path, edit_tensors=lambda t: t.update({"norm.bias": torch.zeros(5)}))
    with pytest.raises(FormatError, match=r"wrong shape \['norm.bias'\]") as e:
        engine.load(str(path), _WithPositionIds(), strict=False)
    assert "strict=False" not in str(e.value)  # the fix does not offer what cannot help
