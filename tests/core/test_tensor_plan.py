"""tensor_plan.py: the checkpoint-mode plan, chosen by tensor names and shapes alone, with the
same patterns and rules as module mode and a reason for every tensor kept in float."""

from __future__ import annotations

import json

import pytest
import torch
from monoquant_plugins.safetensors_format import write_safetensors
from monoquant_plugins.safetensors_io import SafetensorsReader
from safetensors import safe_open

import monoquant_core as mq
from monoquant_core import UsageError
from tests.helpers import (
    expect_failure,
    one_line,
)


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
    assert block0 == {
        *(f"blocks.0.attn.{p}_proj.weight" for p in "qkvo"),
        "blocks.0.mlp.fc1.weight",
        "blocks.0.mlp.fc2.weight",
    }
    assert not plan.get("blocks.0.ln1.weight").selected


def test_plan_reads_headers_only(engine, tmp_path, monkeypatch):
    path = _write_named(tmp_path, NAMED)
    loaded = []
    real = SafetensorsReader.get
    monkeypatch.setattr(SafetensorsReader, "get", lambda self, n: loaded.append(n) or real(self, n))
    engine.plan_checkpoint(str(path))
    assert loaded == []


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


def test_checkpoint_mode_refuses_static(engine, tmp_path):
    src = tmp_path / "w.safetensors"
    write_safetensors(str(src), {"fc.weight": torch.randn(16, 32)}, {"format": "pt"})
    with pytest.raises(UsageError, match="checkpoint mode has no model to run it through"):
        engine.quantize_checkpoint(
            str(src), str(tmp_path / "o.safetensors"), scheme_options={"activations": "static"}
        )


def test_checkpoint_plan_warns_where_group_padding_costs_more_bits(engine, tmp_path):
    path = _write_named(tmp_path, {"a.fc.weight": (16, 384), "b.fc.weight": (16, 512)})
    plan = engine.plan_checkpoint(
        str(path), scheme="int4-group", scheme_options={"group_size": 256}
    )
    assert [e.name for e in plan.selected] == ["a.fc.weight", "b.fc.weight"]
    notes = plan.get("a.fc.weight").notes
    assert any("group_size 256 pads rows of 384 inputs to 512" in n for n in notes), notes
    assert not plan.get("b.fc.weight").notes
