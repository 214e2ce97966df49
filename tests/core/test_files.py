"""Saving and loading: atomic writes, and every bad file is a one-line FormatError."""

from __future__ import annotations

import json
import os

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors
from safetensors import safe_open

import monoquant_core as mq
from monoquant_core import Engine, FormatError, UsageError
from monoquant_core.testing import make_fake_distribution, mlp

from .test_loading import SCHEME_PLUGIN


@pytest.fixture
def saved(tmp_path, engine):
    qmodel, _ = engine.quantize(mlp())
    path = tmp_path / "q.safetensors"
    engine.save(qmodel, str(path))
    return path, qmodel


def _rewrite(path, out, edit_meta=None, edit_tensors=None):
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata())
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    if edit_meta:
        edit_meta(meta)
    if edit_tensors:
        edit_tensors(tensors)
    write_safetensors(str(out), tensors, meta)
    return out


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


def test_output_in_missing_directory_writes_nothing(tmp_path, saved):
    _, qmodel = saved
    target = tmp_path / "missing" / "x.safetensors"
    with pytest.raises(UsageError, match="does not exist.*mkdir -p"):
        mq.save(qmodel, str(target))
    assert not target.parent.exists()


def test_failed_write_leaves_nothing_behind(tmp_path, saved, monkeypatch):
    _, qmodel = saved
    from monoquant_plugins.safetensors_format import SafetensorsSerializer

    def half_write(self, artifact, path):
        with open(path, "wb") as f:
            f.write(b"partial")
        raise RuntimeError("killed midway")

    monkeypatch.setattr(SafetensorsSerializer, "write", half_write)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(RuntimeError, match="killed midway"):
        mq.save(qmodel, str(out / "m.safetensors"))
    assert os.listdir(out) == []


def test_existing_output_is_kept_without_overwrite(tmp_path, saved):
    path, qmodel = saved
    before = path.read_bytes()
    with pytest.raises(UsageError, match="already exists.*--overwrite"):
        mq.save(qmodel, str(path), overwrite=False)
    assert path.read_bytes() == before


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
    out = _rewrite(
        path, tmp_path / "v2.safetensors", edit_meta=lambda m: m.update(format_version="2")
    )
    with pytest.raises(FormatError, match="format version 2 by a newer Mono Quant.*pip install -U"):
        mq.load(str(out), mlp())


def test_inconsistent_quantization_metadata(tmp_path, saved):
    path, _ = saved

    def lie(meta):
        q = json.loads(meta["quantization"])
        q["0.weight"]["shape"] = [64, 31]
        meta["quantization"] = json.dumps(q)

    out = _rewrite(path, tmp_path / "lie.safetensors", edit_meta=lie)
    with pytest.raises(FormatError, match="'0.weight' is inconsistent"):
        mq.load(str(out), mlp())

    def drop(tensors):
        del tensors["2.weight.scale"]

    out2 = _rewrite(path, tmp_path / "drop.safetensors", edit_tensors=drop)
    with pytest.raises(FormatError, match="lacks its 'scale' data"):
        mq.load(str(out2), mlp())
    out3 = _rewrite(
        path, tmp_path / "json.safetensors", edit_meta=lambda m: m.update(quantization="{not json")
    )
    with pytest.raises(FormatError, match="not valid JSON"):
        mq.load(str(out3), mlp())


def test_wrong_model_is_refused_and_left_untouched(saved):
    path, _ = saved
    other = mlp(dims=(32, 64, 64, 11))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(FormatError, match="4.weight has shape"):
        mq.load(str(path), other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
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
