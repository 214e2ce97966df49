"""Checkpoint mode: quantize a safetensors file, a sharded folder or a .pt state_dict, no model.

Every output must mirror its input, round-trip exactly to what module mode gives for the same
weights, and every bad input must be a one-line MonoQuantError that leaves nothing behind.
"""

from __future__ import annotations

import json
import os
import random
import struct

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors
from monoquant_plugins.safetensors_io import SafetensorsReader
from safetensors import safe_open

import monoquant_core as mq
from monoquant_core import CapabilityError, Engine, FormatError, MonoQuantError, Run, UsageError
from monoquant_core.demo import demo_model

INDEX = "model.safetensors.index.json"


# --------------------------------------------------------------------------- helpers


def small_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny Llama-style state_dict (names are what the name-based selection looks at)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g) * 0.02

    sd: dict[str, torch.Tensor] = {"model.embed_tokens.weight": r(96, 32)}
    for i in range(2):
        p = f"model.layers.{i}."
        sd[p + "input_layernorm.weight"] = 1 + r(32)
        sd[p + "self_attn.q_proj.weight"] = r(32, 32)
        sd[p + "self_attn.k_proj.weight"] = r(32, 32)
        sd[p + "self_attn.q_proj.bias"] = r(32)
        sd[p + "mlp.up_proj.weight"] = r(64, 32)
        sd[p + "mlp.down_proj.weight"] = r(32, 64)
    sd["model.norm.weight"] = 1 + r(32)
    sd["lm_head.weight"] = r(96, 32)
    return sd


SMALL_SELECTED = {
    f"model.layers.{i}.{m}.weight"
    for i in range(2)
    for m in ("self_attn.q_proj", "self_attn.k_proj", "mlp.up_proj", "mlp.down_proj")
}


def write_folder(folder, sd, n_shards=3, index=True, extra_files=True):
    """Split ``sd`` into ``n_shards`` HF-style shards (+ index, config.json, a sub-folder and a
    pytorch_model.bin that must not be copied)."""
    os.makedirs(folder, exist_ok=True)
    names = list(sd)
    shards = {}
    for k in range(n_shards):
        fname = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
        part = {n: sd[n] for n in names[k::n_shards]}
        write_safetensors(os.path.join(folder, fname), part, {"format": "pt"})
        shards[fname] = part
    if index:
        wm = {n: f for f, part in shards.items() for n in part}
        doc = {"metadata": {"total_size": 1, "note": "kept"}, "weight_map": wm}
        with open(os.path.join(folder, INDEX), "w") as f:
            json.dump(doc, f)
    if extra_files:
        with open(os.path.join(folder, "config.json"), "w") as f:
            f.write('{"model_type": "llama",\n "hidden_size": 32}\n')
        os.makedirs(os.path.join(folder, "tokenizer"))
        with open(os.path.join(folder, "tokenizer", "vocab.txt"), "w") as f:
            f.write("a\nb\n")
        torch.save({"model.norm.weight": torch.ones(2)}, os.path.join(folder, "pytorch_model.bin"))
    return shards


def tree(root) -> set[str]:
    out = set()
    for d, _, files in os.walk(root):
        for f in files:
            out.add(os.path.relpath(os.path.join(d, f), root))
    return out


def stored(path) -> dict[str, torch.Tensor]:
    """Every tensor stored in a safetensors file, read by the reference implementation."""
    with safe_open(str(path), "pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118


def load_folder(folder) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            part = mq.load(os.path.join(folder, name), dequantize=True)
            assert not set(part) & set(out), f"tensor names repeated across shards: {name}"
            out.update(part)
    return out


def assert_index_consistent(folder):
    with open(os.path.join(folder, INDEX)) as f:
        index = json.load(f)
    wm = index["weight_map"]
    seen: list[str] = []
    total = 0
    for name in sorted(os.listdir(folder)):
        if not name.endswith(".safetensors"):
            continue
        for k, t in stored(os.path.join(folder, name)).items():
            seen.append(k)
            assert wm.get(k) == name, f"{k} is in {name} but the index says {wm.get(k)}"
            total += t.numel() * t.element_size()
    assert len(seen) == len(set(seen)), "a stored name appears in two shards"
    assert set(seen) == set(wm), f"index names not stored: {sorted(set(wm) - set(seen))}"
    print(f"index: {len(wm)} names, total_size {index['metadata']['total_size']} vs {total}")
    assert index["metadata"]["total_size"] == total
    return index


def one_line(err: MonoQuantError) -> str:
    msg = str(err)
    assert "\n" not in msg and msg.startswith("problem: ") and " fix: " in msg, msg
    return msg


def expect_failure(call, dst, exc_type, *needles):
    """``call()`` raises ``exc_type`` (one line naming ``needles``) and writes nothing."""
    parent = os.path.dirname(os.fspath(dst))
    before = sorted(os.listdir(parent))
    with pytest.raises(exc_type) as info:
        call()
    msg = one_line(info.value)
    for needle in needles:
        assert needle in msg, msg
    assert not os.path.exists(dst)
    assert sorted(os.listdir(parent)) == before, "temporary files were left behind"
    return msg


def raw_safetensors(path, header, data: bytes) -> None:
    raw = json.dumps(header).encode()
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw + data)


@pytest.fixture(scope="module")
def demo_sd() -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in demo_model().state_dict().items()}


@pytest.fixture
def small_file(tmp_path):
    sd = small_state()
    src = tmp_path / "in" / "model.safetensors"
    src.parent.mkdir()
    write_safetensors(str(src), sd, {"format": "pt"})
    return src, sd


# --------------------------------------------------------------------------- structure


def test_single_file_output_mirrors_input(engine, small_file, tmp_path):
    src, sd = small_file
    out = tmp_path / "out" / "model.safetensors"
    out.parent.mkdir()
    report = engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert os.listdir(out.parent) == ["model.safetensors"]
    assert {layer.name for layer in report.layers} == SMALL_SELECTED
    keys = set(stored(out))
    expected = {n for n in sd if n not in SMALL_SELECTED}
    expected |= {f"{n}.{r}" for n in SMALL_SELECTED for r in ("qdata", "scale")}
    assert keys == expected
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["format"] == "monoquant" and meta["format_version"] == "1"
    assert set(json.loads(meta["quantization"])) == SMALL_SELECTED
    print(f"{report.model_bytes_before} -> {report.model_bytes_after} bytes")
    assert report.model_bytes_before == sum(t.numel() * t.element_size() for t in sd.values())
    assert (
        report.model_bytes_after
        == os.path.getsize(out) - 8 - struct.unpack("<Q", out.read_bytes()[:8])[0]
    )


def test_sharded_folder_with_index_mirrors_input(engine, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    sd = small_state()
    shards = write_folder(src, sd, n_shards=3)
    report = engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert tree(out) == set(shards) | {INDEX, "config.json", os.path.join("tokenizer", "vocab.txt")}
    assert report.extra["not_copied"] == ["pytorch_model.bin"]
    assert (out / "config.json").read_bytes() == (src / "config.json").read_bytes()
    assert (out / "tokenizer" / "vocab.txt").read_bytes() == b"a\nb\n"
    index = assert_index_consistent(out)
    assert index["metadata"]["note"] == "kept"
    for name in SMALL_SELECTED:
        for role in ("qdata", "scale"):
            assert f"{name}.{role}" in index["weight_map"]
    # every tensor stays in the shard it came from
    for fname, part in shards.items():
        got = mq.load(str(out / fname), dequantize=True)
        assert set(got) == set(part)
    assert sorted(os.listdir(tmp_path)) == ["out", "src"]


def test_folder_without_index(engine, tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    sd = small_state()
    shards = write_folder(src, sd, n_shards=2, index=False, extra_files=False)
    report = engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert tree(out) == set(shards)
    assert "not_copied" not in report.extra
    got = load_folder(out)
    assert set(got) == set(sd)
    for n, t in sd.items():
        if n not in SMALL_SELECTED:
            assert torch.equal(got[n], t), n


def test_pt_state_dict_input(engine, tmp_path):
    sd = small_state()
    sd["model.layers.0.mlp.up_proj.bias"] = torch.randn(128)[::2]  # a strided view
    sd["model.layers.1.self_attn.k_proj.weight"] = torch.randn(32, 32).t() * 0.02  # not contiguous
    for suffix in (".pt", ".bin"):
        src = tmp_path / f"model{suffix}"
        torch.save(sd, src)
        out = tmp_path / f"q{suffix}.safetensors"
        report = engine.quantize_checkpoint(str(src), str(out), progress=False)
        assert {layer.name for layer in report.layers} == SMALL_SELECTED
        got = mq.load(str(out), dequantize=True)
        assert set(got) == set(sd)
        for n, t in sd.items():
            if n not in SMALL_SELECTED:
                assert torch.equal(got[n], t), n
            else:
                print(f"{suffix} {n}: SQNR {mq.sqnr_db(t, got[n]):.1f} dB")
                assert mq.sqnr_db(t, got[n]) > 35


def test_pickled_full_model_needs_trust_pickle(engine, tmp_path):
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    src = tmp_path / "full.pt"
    torch.save(model, src)
    out = tmp_path / "q.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), progress=False),
        out,
        UsageError,
        "--trust-pickle",
    )
    report = engine.quantize_checkpoint(str(src), str(out), trust_pickle=True, progress=False)
    assert {layer.name for layer in report.layers} == {"0.weight", "2.weight"}
    restored = mq.load(
        str(out),
        torch.nn.Sequential(*[torch.nn.Linear(32, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8)]),
    )
    x = torch.randn(4, 32)
    db = mq.sqnr_db(model(x), restored(x))
    print(f"pickled model output SQNR {db:.1f} dB")
    assert db > 30


# --------------------------------------------------------------------------- round trip


ROUND_TRIP = [
    ("int8", {}),
    ("int4-group", {}),
    ("int4-group", {"group_size": 32}),
    ("fp16", {}),
]


@pytest.mark.parametrize("scheme, options", ROUND_TRIP, ids=lambda x: str(x))
def test_round_trip_equals_module_mode(tmp_path, demo_sd, scheme, options):
    """Acceptance: checkpoint mode == module mode, bit for bit, for every tensor."""
    engine = Engine()
    src = tmp_path / "demo.safetensors"
    write_safetensors(str(src), demo_sd, {"format": "pt"})
    out = tmp_path / "q.safetensors"
    # lm_head is a Linear that checkpoint mode keeps in float unless a rule selects it; the
    # position table "pos" is an nn.Embedding that module mode keeps in float.
    report = engine.quantize_checkpoint(
        str(src),
        str(out),
        scheme=scheme,
        scheme_options=options,
        rules=[f"lm_head={scheme}"],
        skip=["pos"],
        progress=False,
    )
    got = mq.load(str(out), dequantize=True)

    qmodel, mreport = Engine().quantize(demo_model(), scheme=scheme, scheme_options=options)
    saved = tmp_path / "module.safetensors"
    Engine().save(qmodel, str(saved))
    expected = Engine().load(str(saved), dequantize=True)

    linear = {n for n, m in demo_model().named_modules() if isinstance(m, torch.nn.Linear)}
    assert {layer.name for layer in report.layers} == {f"{n}.weight" for n in linear}
    assert set(got) == set(expected) == set(demo_sd)
    differ = [
        n for n in got if got[n].dtype != expected[n].dtype or not torch.equal(got[n], expected[n])
    ]
    assert differ == []
    for n, t in demo_sd.items():
        if n.rpartition(".")[0] not in linear or n.endswith(".bias"):
            assert got[n].dtype == t.dtype and torch.equal(got[n], t), n
    # the same numbers from the single per-tensor code path
    cfg = engine.configure(scheme=scheme, scheme_options=options)
    for name in ("blocks.0.attn.q_proj.weight", "blocks.3.mlp.fc2.weight", "lm_head.weight"):
        qt = engine.quantize_weight(
            demo_sd[name], scheme, cfg.observer, 0, cfg.scheme_config, cfg.observer_config
        )
        assert torch.equal(got[name], engine.schemes.get(scheme).dequantize(qt)), name
    sq = {layer.name: layer.sqnr_db for layer in report.layers}
    msq = {layer.name: layer.sqnr_db for layer in mreport.layers}
    print(
        f"{scheme} {options}: min SQNR checkpoint {min(sq.values()):.2f} dB, "
        f"module {min(msq.values()):.2f} dB"
    )
    assert sq == msq


def test_round_trip_sharded_folder_equals_single_file(engine, tmp_path, demo_sd):
    opts = {"group_size": 32}
    src = tmp_path / "src"
    write_folder(src, demo_sd, n_shards=3)
    single = tmp_path / "demo.safetensors"
    write_safetensors(str(single), demo_sd, {"format": "pt"})
    kw = {"scheme": "int4-group", "scheme_options": opts, "progress": False}
    engine.quantize_checkpoint(str(src), str(tmp_path / "out"), **kw)
    Engine().quantize_checkpoint(str(single), str(tmp_path / "one.safetensors"), **kw)
    assert_index_consistent(tmp_path / "out")
    got = load_folder(tmp_path / "out")
    ref = mq.load(str(tmp_path / "one.safetensors"), dequantize=True)
    assert set(got) == set(ref) == set(demo_sd)
    assert [n for n in got if not torch.equal(got[n], ref[n])] == []
    # default selection: lm_head (output head) and embeddings stay in float, bit-identical
    for n in ("lm_head.weight", "embed.weight", "ln_f.weight", "blocks.2.mlp.fc1.bias"):
        assert torch.equal(got[n], demo_sd[n]), n
    w = demo_sd["blocks.1.attn.v_proj.weight"]
    db = mq.sqnr_db(w, got["blocks.1.attn.v_proj.weight"])
    print(f"v_proj SQNR {db:.2f} dB")
    assert 20 < db < 40


# --------------------------------------------------------------------------- plan by names


def _write_named(tmp_path, shapes: dict[str, tuple[int, ...]]):
    g = torch.Generator().manual_seed(1)
    path = tmp_path / "named.safetensors"
    write_safetensors(str(path), {n: torch.randn(*s, generator=g) for n, s in shapes.items()}, {})
    return path


NAMED = {
    "transformer.wte.weight": (64, 128),
    "model.embed_tokens.weight": (64, 128),
    "model.layers.0.input_layernorm.weight": (16,),
    "model.final_norm.weight": (4, 128),
    "model.layers.0.ln_2.weight": (4, 128),
    "model.layers.0.self_attn.q_proj.weight": (16, 128),
    "model.layers.0.self_attn.q_proj.bias": (16,),
    "model.layers.0.mlp.up_proj.weight": (32, 128),
    "model.layers.0.mlp.conv.weight": (8, 4, 3),
    "model.layers.0.rotary.inv_freq": (8,),
    "lm_head.weight": (64, 128),
}


def test_default_plan_skips_with_reasons(engine, tmp_path):
    path = _write_named(tmp_path, NAMED)
    plan = engine.plan_checkpoint(str(path))
    assert plan.unit == "tensors" and len(plan) == len(NAMED)
    reasons = {e.name: e.skip_reason for e in plan}
    print("\n".join(f"{n}: {r}" for n, r in reasons.items()))
    assert {e.name for e in plan.selected} == {
        "model.layers.0.self_attn.q_proj.weight",
        "model.layers.0.mlp.up_proj.weight",
    }
    assert "embedding" in reasons["transformer.wte.weight"]
    assert "embedding" in reasons["model.embed_tokens.weight"]
    assert "1-D" in reasons["model.layers.0.input_layernorm.weight"]
    assert "normalisation" in reasons["model.final_norm.weight"]
    assert "normalisation" in reasons["model.layers.0.ln_2.weight"]
    assert "not a weight" in reasons["model.layers.0.self_attn.q_proj.bias"]
    assert "3-D" in reasons["model.layers.0.mlp.conv.weight"]
    assert "not a weight" in reasons["model.layers.0.rotary.inv_freq"]
    assert "output head" in reasons["lm_head.weight"]
    for e in plan.selected:
        assert (e.scheme, e.observer) == ("int8", "minmax")
    assert "2 of 11 tensors will be quantized" in plan.render()


def test_rules_select_lm_head_and_embeddings(engine, tmp_path):
    path = _write_named(tmp_path, NAMED)
    plan = engine.plan_checkpoint(
        str(path),
        rules=[
            "lm_head=int8",
            "*embed_tokens=int4-group,group_size=32",
            "transformer.wte.weight=fp16",
        ],
        scheme="int4-group",
    )
    by = {e.name: e for e in plan}
    assert by["lm_head.weight"].selected and by["lm_head.weight"].scheme == "int8"
    emb = by["model.embed_tokens.weight"]
    assert emb.selected and emb.scheme == "int4-group"
    assert "group_size" in emb.options["scheme_options"]
    assert by["transformer.wte.weight"].scheme == "fp16"  # matched by the full tensor name
    assert by["model.layers.0.mlp.up_proj.weight"].scheme == "int4-group"
    out = tmp_path / "q.safetensors"
    report = engine.quantize_checkpoint(
        str(path),
        str(out),
        rules=["lm_head=int8", "*embed_tokens=int4-group,group_size=32"],
        scheme="int4-group",
        progress=False,
    )
    layers = {layer.name: layer for layer in report.layers}
    assert layers["lm_head.weight"].scheme == "int8"
    assert layers["model.embed_tokens.weight"].scheme == "int4-group"
    with safe_open(str(out), "pt") as f:
        quant = json.loads(f.metadata()["quantization"])
    assert quant["model.embed_tokens.weight"]["group_size"] == 32
    assert quant["model.layers.0.mlp.up_proj.weight"]["group_size"] == 128
    assert quant["lm_head.weight"]["bits"] == 8


def test_only_restricts_and_skip_beats_rules(engine, tmp_path):
    path = _write_named(tmp_path, NAMED)
    plan = engine.plan_checkpoint(str(path), only=["*.q_proj.weight", "lm_head"])
    assert {e.name for e in plan.selected} == {
        "model.layers.0.self_attn.q_proj.weight",
        "lm_head.weight",
    }
    assert plan.get("model.layers.0.mlp.up_proj.weight").skip_reason == (
        "not matched by any only pattern"
    )
    plan = engine.plan_checkpoint(str(path), skip=["lm_head", "*.mlp.*"], rules=["lm_head=int8"])
    assert plan.get("lm_head.weight").skip_reason == "matched skip pattern 'lm_head'"
    up = plan.get("model.layers.0.mlp.up_proj.weight")
    assert up.skip_reason == "matched skip pattern '*.mlp.*'"
    plan = engine.plan_checkpoint(str(path), only=["*_proj.weight"], skip=["*.q_proj"])
    assert [e.name for e in plan.selected] == ["model.layers.0.mlp.up_proj.weight"]
    plan = engine.plan_checkpoint(str(path), rules=["*.q_proj=skip"])
    assert "rule" in plan.get("model.layers.0.self_attn.q_proj.weight").skip_reason
    for bad in ({"only": ["nothing.*"]}, {"rules": ["nothing=int8"]}):
        with pytest.raises(UsageError) as e:
            engine.plan_checkpoint(str(path), **bad)
        assert "matches no tensor" in one_line(e.value)


def test_layer_patterns_keep_the_layers_biases_and_norms_in_float(engine, tmp_path, demo_sd):
    """Patterns match module names "as in module mode": ``--only '*.q_proj'`` means the q_proj
    layers, and the CLI's own ``--rule`` example ``blocks.0.*=int4-group,group_size=32`` means
    the layers of block 0. Their 2-D weights must be selected and their 1-D biases / norms kept
    in float with a reason (module mode does the same), not make the whole run an error."""
    src = tmp_path / "demo.safetensors"
    write_safetensors(str(src), demo_sd, {"format": "pt"})
    plan = engine.plan_checkpoint(str(src), only=["*.q_proj"])
    assert {e.name for e in plan.selected} == {f"blocks.{i}.attn.q_proj.weight" for i in range(4)}
    assert not plan.get("blocks.0.attn.q_proj.bias").selected
    plan = engine.plan_checkpoint(str(src), rules=["blocks.0.*=int4-group,group_size=32"])
    block0 = {e.name for e in plan.selected if e.scheme == "int4-group"}
    assert len(block0) == 6 and all(n.startswith("blocks.0.") for n in block0)
    assert not plan.get("blocks.0.ln1.weight").selected


def test_plan_reads_headers_only(engine, tmp_path, monkeypatch):
    path = _write_named(tmp_path, NAMED)
    loaded = []
    real = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, n: loaded.append(n) or real(self, n))
    engine.plan_checkpoint(str(path))
    assert loaded == []


# --------------------------------------------------------------------------- bad inputs


def test_missing_input_and_folder_without_safetensors(engine, tmp_path):
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(tmp_path / "nope.safetensors"), str(out)),
        out,
        UsageError,
        "does not exist",
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    torch.save({"w": torch.ones(2, 2)}, empty / "pytorch_model.bin")
    expect_failure(
        lambda: engine.quantize_checkpoint(str(empty), str(tmp_path / "o")),
        tmp_path / "o",
        UsageError,
        "no .safetensors files",
    )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"PK\x03\x04 a zip file")
    expect_failure(lambda: engine.quantize_checkpoint(str(junk), str(out)), out, FormatError)


@pytest.mark.parametrize(
    "edit, needle",
    [
        (lambda d: "{not json", "not valid JSON"),
        (
            lambda d: json.dumps(
                {"weight_map": {**d["weight_map"], "x.weight": "gone.safetensors"}}
            ),
            "gone.safetensors",
        ),
        (
            lambda d: json.dumps(
                {
                    "weight_map": {
                        **d["weight_map"],
                        "lm_head.weight": "model-00001-of-00003.safetensors",
                    }
                }
            ),
            "'lm_head.weight'",
        ),
        (lambda d: json.dumps({"weight_map": ["a", "b"]}), "weight_map"),
        (lambda d: json.dumps({"weight_map": {"x": "../model.safetensors"}}), "not a file name"),
    ],
    ids=["invalid-json", "missing-shard", "wrong-shard", "weight-map-list", "path-in-shard"],
)
def test_broken_index(engine, tmp_path, edit, needle):
    src = tmp_path / "src"
    write_folder(src, small_state(), n_shards=3, extra_files=False)
    doc = json.loads((src / INDEX).read_text())
    (src / INDEX).write_text(edit(doc))
    out = tmp_path / "out"
    expect_failure(lambda: engine.quantize_checkpoint(str(src), str(out)), out, FormatError, needle)


def test_index_metadata_that_is_not_an_object_is_a_format_error(engine, tmp_path):
    """The index's "metadata" is merged with ``{**metadata}``: a string there must be refused
    as a FormatError, not crash with TypeError after every shard was written."""
    src = tmp_path / "src"
    write_folder(src, small_state(), n_shards=2, extra_files=False)
    doc = json.loads((src / INDEX).read_text())
    doc["metadata"] = "total_size=1"
    (src / INDEX).write_text(json.dumps(doc))
    out = tmp_path / "out"
    expect_failure(lambda: engine.quantize_checkpoint(str(src), str(out)), out, FormatError, INDEX)


def test_same_tensor_in_two_shards_is_refused(engine, tmp_path):
    """A name stored in two shards makes the output index ambiguous (weight_map can map it to
    one shard only): the input must be refused, with or without an index."""
    src = tmp_path / "src"
    src.mkdir()
    g = torch.Generator().manual_seed(0)
    a = {"x.weight": torch.randn(16, 16, generator=g), "y.weight": torch.randn(16, 16, generator=g)}
    b = {"x.weight": torch.randn(16, 16, generator=g), "z.weight": torch.randn(16, 16, generator=g)}
    write_safetensors(str(src / "a.safetensors"), a, {})
    write_safetensors(str(src / "b.safetensors"), b, {})
    out = tmp_path / "out"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out)), out, FormatError, "x.weight"
    )
    wm = {"x.weight": "a.safetensors", "y.weight": "a.safetensors", "z.weight": "b.safetensors"}
    (src / INDEX).write_text(json.dumps({"weight_map": wm}))
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out)), out, FormatError, "x.weight"
    )


@pytest.mark.parametrize("where", ["file", "shard"])
def test_truncated_input(engine, tmp_path, small_file, where):
    src, sd = small_file
    data = src.read_bytes()
    if where == "file":
        bad = tmp_path / "cut.safetensors"
        bad.write_bytes(data[: len(data) - 100])
        out = tmp_path / "out.safetensors"
    else:
        bad = tmp_path / "folder"
        write_folder(bad, sd, n_shards=3, extra_files=False)
        shard = bad / "model-00002-of-00003.safetensors"
        shard.write_bytes(shard.read_bytes()[:-7])
        out = tmp_path / "out"
    expect_failure(lambda: engine.quantize_checkpoint(str(bad), str(out)), out, FormatError)


def _lying_headers():
    ok = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    return {
        "shape-vs-offsets": ({"a.weight": {**ok, "shape": [4, 5]}}, 64, "needs 80 bytes"),
        "offsets-past-end": (
            {"a.weight": {**ok, "shape": [8, 4], "data_offsets": [0, 128]}},
            64,
            "describes 128 bytes",
        ),
        "overlap": ({"a.weight": ok, "b.weight": ok}, 64, "expected 64"),
        "gap": ({"a.weight": {**ok, "data_offsets": [8, 72]}}, 72, "starts at byte 8"),
        "negative": ({"a.weight": {**ok, "data_offsets": [-64, 0]}}, 64, "invalid header entry"),
        "unknown-dtype": ({"a.weight": {**ok, "dtype": "F7"}}, 64, "unknown dtype"),
        "metadata-not-strings": ({"__metadata__": {"a": 1}, "a.weight": ok}, 64, "__metadata__"),
    }


@pytest.mark.parametrize("case", list(_lying_headers()))
def test_header_that_lies_about_sizes(engine, tmp_path, case):
    header, nbytes, needle = _lying_headers()[case]
    bad = tmp_path / "lie.safetensors"
    raw_safetensors(bad, header, bytes(nbytes))
    out = tmp_path / "out.safetensors"
    expect_failure(lambda: engine.quantize_checkpoint(str(bad), str(out)), out, FormatError, needle)
    with pytest.raises(FormatError):
        engine.inspect(str(bad))


def test_nan_or_inf_weight(engine, tmp_path):
    g = torch.Generator().manual_seed(0)
    nan, inf = torch.randn(16, 16, generator=g), torch.randn(16, 16, generator=g)
    nan[3, 4] = float("nan")
    inf[0, 0], inf[5, 5] = float("inf"), float("-inf")
    good = torch.randn(16, 16, generator=g)
    src = tmp_path / "in.safetensors"
    write_safetensors(str(src), {"good.weight": good, "a.nan.weight": nan, "b.inf.weight": inf}, {})
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), progress=False),
        out,
        UsageError,
        "NaN/Inf",
        "--allow-nonfinite",
    )
    with pytest.raises(UsageError, match="'b.inf.weight' contains 2 NaN/Inf"):
        engine.quantize_checkpoint(str(src), str(out), skip=["a.nan"], progress=False)
    assert not out.exists()
    report = engine.quantize_checkpoint(str(src), str(out), allow_nonfinite=True, progress=False)
    assert [layer.name for layer in report.layers] == ["good.weight"]
    skipped = dict(report.skipped)
    print(skipped)
    assert "1 NaN/Inf" in skipped["a.nan.weight"] and "2 NaN/Inf" in skipped["b.inf.weight"]
    got = mq.load(str(out), dequantize=True)
    assert torch.equal(got["a.nan.weight"].nan_to_num(), nan.nan_to_num())
    assert got["a.nan.weight"].isnan().sum() == 1
    assert torch.equal(got["b.inf.weight"], inf)
    assert set(stored(out)) == {
        "good.weight.qdata",
        "good.weight.scale",
        "a.nan.weight",
        "b.inf.weight",
    }


def test_verify_accepts_bit_identical_copies_holding_nan(engine, tmp_path):
    """--allow-nonfinite keeps a NaN tensor bit for bit; verify must not call that copy
    "altered" (torch.equal treats NaN != NaN) and fail the quality gate."""
    w = torch.randn(8, 8)
    w[1, 1] = float("nan")
    src = tmp_path / "in.safetensors"
    write_safetensors(str(src), {"bad.weight": w, "good.weight": torch.randn(8, 8)}, {})
    out = tmp_path / "q.safetensors"
    engine.quantize_checkpoint(str(src), str(out), allow_nonfinite=True, progress=False)
    assert stored(out)["bad.weight"].view(torch.int32).equal(w.view(torch.int32))
    res = engine.verify(str(src), str(out), progress=False)
    print(res["mismatched_copies"], [(r["name"], r["exact"]) for r in res["tensors"]])
    assert res["mismatched_copies"] == []
    from monoquant_core.inspection import verify_failed

    assert not verify_failed(res, 10.0)


@pytest.mark.parametrize(
    "scheme, options",
    [
        ("int8", {}),
        ("int8", {"symmetric": False}),
        ("int4-group", {}),
        ("int4-group", {"group_size": 32, "zero": "int", "method": "rtn"}),
    ],
)
def test_all_zero_rows_round_trip_to_zeros(engine, tmp_path, scheme, options):
    g = torch.Generator().manual_seed(0)
    w = torch.randn(16, 256, generator=g)
    w[2] = 0
    w[9, :128] = 0
    src = tmp_path / "z.safetensors"
    write_safetensors(str(src), {"a.weight": w, "zero.weight": torch.zeros(8, 256)}, {})
    out = tmp_path / "q.safetensors"
    report = engine.quantize_checkpoint(
        str(src), str(out), scheme=scheme, scheme_options=options, progress=False
    )
    got = mq.load(str(out), dequantize=True)
    assert torch.equal(got["zero.weight"], torch.zeros(8, 256))
    assert torch.equal(got["a.weight"][2], torch.zeros(256))
    assert torch.equal(got["a.weight"][9, :128], torch.zeros(128))
    assert torch.isfinite(got["a.weight"]).all()
    sq = {layer.name: layer.sqnr_db for layer in report.layers}
    print(f"{scheme} {options}: {sq}")
    assert sq["zero.weight"] == float("inf") and sq["a.weight"] > 15


def test_explicitly_selected_1d_or_empty_tensor_is_an_error(engine, tmp_path):
    src = tmp_path / "in.safetensors"
    sd = {"fc.weight": torch.randn(8, 8), "fc.bias": torch.randn(8), "e.weight": torch.zeros(0, 8)}
    write_safetensors(str(src), sd, {})
    out = tmp_path / "out.safetensors"
    for kw, needle in (
        ({"rules": ["fc.bias=int8"]}, "'fc.bias' of shape (8,)"),
        ({"only": ["*.bias"]}, "'fc.bias' of shape (8,)"),
        ({"only": ["e"]}, "'e.weight' of shape (0, 8)"),
        ({"rules": ["e.weight=int4-group"]}, "'e.weight' of shape (0, 8)"),
    ):
        expect_failure(
            lambda kw=kw: engine.quantize_checkpoint(str(src), str(out), progress=False, **kw),
            out,
            UsageError,
            needle,
            "cannot be quantized",
        )


@pytest.mark.parametrize("shape", [(0, 16), (16, 0)])
def test_empty_2d_weight_is_kept_by_default(engine, tmp_path, shape):
    """A 0-size 2-D ``*.weight`` is not selected explicitly, so the default plan must skip it
    with a reason (as module mode does: "weight is empty"), not crash inside the observer."""
    src = tmp_path / "in.safetensors"
    sd = {"fc.weight": torch.randn(8, 8), "e.weight": torch.zeros(*shape)}
    write_safetensors(str(src), sd, {})
    plan = engine.plan_checkpoint(str(src))
    assert not plan.get("e.weight").selected
    out = tmp_path / "out.safetensors"
    report = engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert "e.weight" in dict(report.skipped)
    assert tuple(mq.load(str(out), dequantize=True)["e.weight"].shape) == shape


def test_output_paths_are_checked(engine, tmp_path, small_file):
    src, sd = small_file
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(src), overwrite=True),
        tmp_path / "never",
        UsageError,
        "is the input",
    )
    assert stored(src).keys() == sd.keys()
    folder = tmp_path / "folder"
    write_folder(folder, sd, n_shards=2, extra_files=False)
    before = tree(folder)
    for dst in (folder / "quantized", folder):
        with pytest.raises(UsageError) as e:
            engine.quantize_checkpoint(str(folder), str(dst), overwrite=True)
        one_line(e.value)
        assert tree(folder) == before
    with pytest.raises(UsageError, match="contain one another"):
        engine.quantize_checkpoint(str(folder), str(tmp_path), overwrite=True)
    missing_parent = tmp_path / "no" / "such" / "out.safetensors"
    with pytest.raises(UsageError, match="does not exist"):
        engine.quantize_checkpoint(str(src), str(missing_parent))
    assert not (tmp_path / "no").exists()


def test_existing_output_needs_overwrite(engine, tmp_path, small_file):
    src, sd = small_file
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"keep me")
    with pytest.raises(UsageError) as e:
        engine.quantize_checkpoint(str(src), str(out), progress=False)
    assert "--overwrite" in one_line(e.value)
    assert out.read_bytes() == b"keep me"
    engine.quantize_checkpoint(str(src), str(out), overwrite=True, progress=False)
    assert set(mq.load(str(out), dequantize=True)) == set(sd)
    # folders: an existing output folder is replaced as a whole, never merged into
    folder, dst = tmp_path / "src", tmp_path / "dst"
    write_folder(folder, sd, n_shards=2, extra_files=False)
    dst.mkdir()
    (dst / "stale.txt").write_text("old")
    with pytest.raises(UsageError, match="already exists"):
        engine.quantize_checkpoint(str(folder), str(dst), progress=False)
    assert tree(dst) == {"stale.txt"}
    engine.quantize_checkpoint(str(folder), str(dst), overwrite=True, progress=False)
    assert tree(dst) == tree(folder)
    assert sorted(os.listdir(tmp_path)) == ["dst", "in", "out.safetensors", "src"]


def test_malicious_pickle_does_not_run(engine, tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    src = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(4, 4), "x": Payload()}, src)
    out = tmp_path / "out.safetensors"
    msg = expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out)), out, UsageError, "--trust-pickle"
    )
    print(msg)
    with pytest.raises(UsageError, match="--trust-pickle"):
        engine.plan_checkpoint(str(src))
    with pytest.raises(UsageError, match="--trust-pickle"):
        engine.inspect(str(src))
    assert not marker.exists()


GARBAGE_PT = {
    "text": b"this is not a pickle \x00\x01\x02" * 4,  # weights_only unpickler: IndexError
    "bad-memo": b"\x80\x02" + b"junk" * 10,  # weights_only unpickler: KeyError
    "random": bytes(random.Random(0).randrange(256) for _ in range(200)),
    "empty": b"",
    "zip-header-only": b"PK\x03\x04" + bytes(100),
}


@pytest.mark.parametrize("trust", [False, True], ids=["default", "trust-pickle"])
@pytest.mark.parametrize("case", list(GARBAGE_PT))
def test_garbage_pt_file_is_a_format_error(engine, tmp_path, case, trust):
    """Bytes that are not a torch.save file: a one-line MonoQuantError (a FormatError once
    trusted unpickling failed too), never the unpickler's IndexError / KeyError /
    UnpicklingError."""
    src = tmp_path / "garbage.pt"
    src.write_bytes(GARBAGE_PT[case])
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), trust_pickle=trust),
        out,
        FormatError if trust else MonoQuantError,
    )


def test_pt_with_non_string_keys_is_refused(engine, tmp_path):
    src = tmp_path / "ints.pt"
    torch.save({0: torch.randn(8, 8), 1: torch.randn(8)}, src)
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out)), out, (FormatError, UsageError)
    )


def test_already_quantized_input_is_refused(engine, tmp_path, small_file):
    src, _ = small_file
    q = tmp_path / "q.safetensors"
    engine.quantize_checkpoint(str(src), str(q), progress=False)
    out = tmp_path / "qq.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(q), str(out)),
        out,
        UsageError,
        "already quantized",
        "dequantize",
    )


def test_activation_or_unknown_scheme_fails_before_reading(engine, tmp_path, small_file):
    src, _ = small_file
    out = tmp_path / "out.safetensors"
    expect_failure(
        lambda: engine.quantize_checkpoint(str(src), str(out), scheme="int3"),
        out,
        UsageError,
        "int3",
    )
    expect_failure(
        lambda: engine.quantize_checkpoint(
            str(src), str(out), scheme="int4-group", scheme_options={"group_size": 48}
        ),
        out,
        (UsageError, CapabilityError),
        "48",
    )


# --------------------------------------------------------------------------- crash safety


@pytest.mark.parametrize("kind", ["file", "folder", "folder-overwrite"])
def test_crash_midway_leaves_nothing(engine, tmp_path, monkeypatch, kind):
    sd = small_state()
    if kind == "file":
        src = tmp_path / "model.safetensors"
        write_safetensors(str(src), sd, {})
        dst = tmp_path / "out.safetensors"
    else:
        src = tmp_path / "src"
        write_folder(src, sd, n_shards=3)
        dst = tmp_path / "out"
    if kind == "folder-overwrite":
        dst.mkdir()
        (dst / "previous.txt").write_text("previous output")
    before = sorted(os.listdir(tmp_path))
    real = Run.quantize_weight
    calls = []

    def crash_on_third(self, *args, **kwargs):
        calls.append(args[-1])
        if len(calls) == 3:
            raise RuntimeError("simulated crash")
        return real(self, *args, **kwargs)

    monkeypatch.setattr(Run, "quantize_weight", crash_on_third)
    with pytest.raises(RuntimeError, match="simulated crash"):
        engine.quantize_checkpoint(str(src), str(dst), overwrite=True, progress=False)
    assert len(calls) == 3
    assert sorted(os.listdir(tmp_path)) == before
    if kind == "folder-overwrite":
        assert tree(dst) == {"previous.txt"}
    else:
        assert not dst.exists()


def test_unselected_tensors_are_copied_without_loading(engine, tmp_path, monkeypatch):
    src = tmp_path / "src"
    sd = small_state()
    write_folder(src, sd, n_shards=3, extra_files=False)
    loaded: list[str] = []
    real = SafetensorsReader.get

    def recording_get(self, name):
        loaded.append(name)
        return real(self, name)

    monkeypatch.setattr(SafetensorsReader, "get", recording_get)
    report = engine.quantize_checkpoint(str(src), str(tmp_path / "out"), progress=False)
    print(f"loaded {len(loaded)} of {len(sd)} tensors")
    assert sorted(loaded) == sorted(SMALL_SELECTED)
    assert {n for n, _ in report.skipped}.isdisjoint(loaded)
    monkeypatch.setattr(SafetensorsReader, "get", real)
    got = load_folder(tmp_path / "out")
    for n, t in sd.items():
        if n not in SMALL_SELECTED:
            assert torch.equal(got[n], t), n


def test_report_hook_failure_commits_nothing(tmp_path):
    from monoquant_core import Engine, PluginError, hookimpl

    class Boom:
        @hookimpl
        def monoquant_report(self, report, run):
            raise RuntimeError("report sink down")

    src = tmp_path / "m.safetensors"
    write_safetensors(str(src), {"a.weight": torch.randn(32, 256)}, {})
    out = tmp_path / "q.safetensors"
    with pytest.raises(PluginError, match="report sink down"):
        Engine(plugins=[Boom()]).quantize_checkpoint(str(src), str(out), progress=False)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
