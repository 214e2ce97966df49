"""Per-layer rules: mixed precision by pattern, from Python, the CLI and rules files."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import monoquant_core as mq
from monoquant_core import CapabilityError, UsageError
from monoquant_core.cli import build_cli
from monoquant_core.demo import demo_model
from monoquant_core.rules import Rule, parse_rules


def test_rule_text_forms():
    assert Rule.parse("lm_head=int8") == Rule("lm_head", scheme="int8")
    r = Rule.parse("blocks.0.*=int4-group,group_size=32,observer=histogram,observer.grid=5")
    assert r.scheme == "int4-group" and dict(r.scheme_options) == {"group_size": "32"}
    assert r.observer == "histogram" and dict(r.observer_options) == {"grid": "5"}
    assert Rule.parse("embed=skip").skip
    assert parse_rules([("a", "int8"), ("b", {"scheme": "int8"}), {"pattern": "c", "skip": True}])
    for bad in ("nopattern", "x=", "x=skip,a=1", "x=int8,oops"):
        with pytest.raises(UsageError):
            Rule.parse(bad)


def test_mixed_precision_first_and_last_layers_int8(engine):
    model = demo_model()
    _, report = engine.quantize(
        model,
        scheme="int4-group",
        rules=[
            "blocks.0.*=int8",
            "lm_head=int8",
            "blocks.3.mlp.*=int4-group,group_size=32",
            "blocks.2.attn.q_proj=skip",
        ],
    )
    by_name = {layer.name: layer for layer in report.layers}
    assert by_name["blocks.0.attn.q_proj.weight"].scheme == "int8"
    assert by_name["lm_head.weight"].scheme == "int8"
    assert by_name["blocks.1.mlp.fc1.weight"].scheme == "int4-group"
    assert by_name["blocks.1.mlp.fc1.weight"].bits_per_weight == pytest.approx(4.25)
    assert by_name["blocks.3.mlp.fc1.weight"].bits_per_weight == pytest.approx(5.0)
    assert "blocks.2.attn.q_proj.weight" not in by_name
    assert dict(report.skipped)["blocks.2.attn.q_proj"] == "rule 'blocks.2.attn.q_proj=skip'"


def test_rule_selects_opt_in_layers_and_first_match_wins(engine):
    plan = engine.plan(demo_model(), rules=["embed=int8", "*_head=int4-group", "lm_head=int8"])
    assert plan.get("embed").selected and plan.get("embed").scheme == "int8"
    assert plan.get("lm_head").scheme == "int4-group"  # the earlier '*_head' rule matched first
    assert not plan.get("pos").selected  # opt-in layers need a rule or --only naming them


def test_skip_patterns_beat_rules(engine):
    plan = engine.plan(demo_model(), skip=["lm_head"], rules=["lm_head=int8"])
    assert plan.get("lm_head").skip_reason == "matched skip pattern 'lm_head'"


def test_bad_rules_fail_before_compute(engine):
    with pytest.raises(UsageError, match="rule 'x=int3': unknown scheme 'int3'"):
        engine.configure(rules=["x=int3"])
    with pytest.raises(CapabilityError, match="group size 7"):
        engine.configure(rules=["x=int4-group,group_size=7"])
    with pytest.raises(UsageError, match="unknown option 'bogus' for scheme 'int8'"):
        engine.configure(rules=["x=int8,bogus=1"])
    with pytest.raises(UsageError, match="matches no module"):
        engine.plan(demo_model(), rules=["lm_haed=int8"])


def test_rules_round_trip_through_save_load(tmp_path, engine):
    x = torch.randint(0, 2048, (2, 16))
    q, _ = engine.quantize(demo_model(), scheme="int4-group", rules=["lm_head=int8"])
    path = tmp_path / "mixed.safetensors"
    mq.save(q, str(path))
    back = mq.load(str(path), demo_model())
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_cli_rule_and_rules_file(engine, tmp_path):
    cli = build_cli(engine)
    rules = tmp_path / "rules.json"
    rules.write_text(
        json.dumps(
            [{"pattern": "lm_head", "scheme": "int8"}, {"pattern": "blocks.0.*", "skip": True}]
        )
    )
    res = CliRunner().invoke(
        cli,
        [
            "quantize",
            "--demo",
            "--scheme",
            "int4-group",
            "--rules",
            str(rules),
            "--rule",
            "blocks.1.*=int8",
            "--json",
        ],
    )
    assert res.exit_code == 0, res.output
    layers = {lay["name"]: lay["scheme"] for lay in json.loads(res.output)["layers"]}
    assert layers["lm_head.weight"] == "int8" and layers["blocks.1.mlp.fc1.weight"] == "int8"
    assert layers["blocks.2.mlp.fc1.weight"] == "int4-group"
    assert not any(n.startswith("blocks.0.") for n in layers)
    toml = tmp_path / "rules.toml"
    toml.write_text('[[rule]]\npattern = "lm_head"\nscheme = "int8"\n')
    res = CliRunner().invoke(cli, ["plan", "--demo", "--rules", str(toml)])
    assert res.exit_code == 0 and "rule 'lm_head=int8'" in res.output
    res = CliRunner().invoke(cli, ["plan", "--demo", "--rule", "lm_head"])
    assert res.exit_code == 1 and "not PATTERN=SCHEME" in res.output
