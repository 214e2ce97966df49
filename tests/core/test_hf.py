"""Hugging Face round trip: checkpoint mode marks a transformers folder's config.json, and with
``monoquant_core.hf`` imported ``AutoModel.from_pretrained`` loads the quantized layers, equal
to :func:`monoquant_core.load` into the same architecture. Skipped without transformers (CI
installs the ``hf`` extra)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from monoquant_core import Engine, UsageError, load
from monoquant_core.streaming import mark_hf_config
from tests.helpers import tiny_bert

transformers = pytest.importorskip("transformers", reason="needs the hf extra (transformers)")


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    float_model, cfg = tiny_bert(root / "float")
    Engine().quantize_checkpoint(str(root / "float"), str(root / "q"), progress=False)
    return root, float_model, cfg


def test_checkpoint_mode_marks_the_config(folders):
    root, _, _ = folders
    cfg = json.loads((root / "q" / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "monoquant" and qc["format"] == "monoquant-safetensors"
    assert "import monoquant_core.hf" in qc["load_with"]
    assert "quantization_config" not in json.loads((root / "float" / "config.json").read_text())


def test_from_pretrained_loads_the_quantized_layers(folders):
    root, float_model, cfg = folders
    import monoquant_core.hf  # noqa: F401  (registers "monoquant" with transformers)

    model, info = transformers.AutoModel.from_pretrained(str(root / "q"), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    query = model.encoder.layer[0].attention.self.query
    assert type(query).__name__ == "QuantizedLinear" and query.scheme.name == "int8"
    ours = load(str(root / "q"), transformers.BertModel(cfg).eval())
    ids = torch.randint(0, 120, (2, 16))
    with torch.no_grad():
        got, want = model(ids).last_hidden_state, ours(ids).last_hidden_state
        ref = float_model(ids).last_hidden_state
    assert torch.equal(got, want)  # exactly what load() builds
    cos = torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0)
    assert cos > 0.999, cos  # and not random weights (int8 of a random BERT)


def test_save_pretrained_of_a_loaded_model_is_refused(folders, tmp_path):
    root, _, _ = folders
    import monoquant_core.hf  # noqa: F401

    model = transformers.AutoModel.from_pretrained(str(root / "q"))
    with pytest.raises(ValueError, match="monoquant"):
        model.save_pretrained(tmp_path / "again")


def test_register_is_idempotent_and_needs_transformers(monkeypatch):
    from monoquant_core import hf

    hf.register()
    hf.register()
    monkeypatch.setattr(hf, "_registered", {})
    monkeypatch.setitem(sys.modules, "transformers.quantizers", None)
    with pytest.raises(UsageError, match=r"needs transformers .*pip install 'monoquant\[hf\]'"):
        hf.register()


@pytest.mark.parametrize(
    "text, marked",
    [
        ('{"model_type": "bert", "hidden_size": 8}', True),
        ('{"architectures": ["X"]}', True),
        ('{"learning_rate": 0.1}', False),  # some other tool's config.json
        ("[1, 2]", False),
        ("not json", False),
    ],
)
def test_only_a_transformers_config_is_marked(tmp_path, text, marked):
    path = tmp_path / "config.json"
    path.write_text(text)
    qc = {"quant_method": "monoquant"}
    assert mark_hf_config(str(path), qc) is marked
    if marked:
        assert json.loads(path.read_text())["quantization_config"] == qc
        assert mark_hf_config(str(path), None)  # a float output: removed again
        assert json.loads(path.read_text()) == json.loads(text)
    else:
        assert path.read_text() == text
