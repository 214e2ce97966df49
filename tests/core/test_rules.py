"""rules.py: per-layer rules (mixed precision by pattern) in every accepted form, first match
wins, and rules files. (The CLI flags: tests/cli/test_options.py.)"""

from __future__ import annotations

import json
import re

import pytest
import torch

import monoquant_core as mq
from monoquant_core import UsageError
from monoquant_core.demo import demo_model
from monoquant_core.rules import Rule, load_rules_file, parse_rules


def test_rule_text_forms():
    assert Rule.parse("lm_head=int8") == Rule("lm_head", scheme="int8")
    r = Rule.parse("blocks.0.*=int4-group,group_size=32,observer=histogram,observer.grid=5")
    assert r.scheme == "int4-group" and dict(r.scheme_options) == {"group_size": "32"}
    assert r.observer == "histogram" and dict(r.observer_options) == {"grid": "5"}
    assert Rule.parse("embed=skip").skip
    forms = [("a", "int8"), ("b", {"scheme": "int8"}), {"pattern": "c", "skip": True}]
    assert [r.describe() for r in parse_rules(forms)] == ["a=int8", "b=int8", "c=skip"]
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


def test_rules_round_trip_through_save_load(tmp_path, engine):
    x = torch.randint(0, 2048, (2, 16))
    q, _ = engine.quantize(demo_model(), scheme="int4-group", rules=["lm_head=int8"])
    path = tmp_path / "mixed.safetensors"
    mq.save(q, str(path))
    back = mq.load(str(path), demo_model())
    with torch.no_grad():
        assert torch.equal(back(x), q(x))


def test_rule_forms_and_describe():
    rules = parse_rules(
        [
            Rule("a", skip=True),
            "b=int4-group,group_size=32,backend=reference",
            ("c", "skip"),
            ("d", {"scheme": "int8", "observer": "histogram", "observer_options": {"grid": 5}}),
            {"pattern": "e", "scheme": "fp16"},
        ]
    )
    assert [r.describe() for r in rules] == [
        "a=skip",
        "b=int4-group,group_size=32,backend=reference",
        "c=skip",
        "d=int8,observer=histogram,observer.grid=5",
        "e=fp16",
    ]
    assert rules[1].to_dict()["scheme_options"] == {"group_size": "32"}
    for bad, needle in (
        (42, "is not a rule"),
        (("x", 3), "the action must be a string or a mapping"),
        ({"scheme": "int8"}, "has no 'pattern'"),
        ({"pattern": "x", "colour": "red"}, "has unknown keys ['colour']"),
        ({"pattern": "x", "schem": "int8"}, "fix: did you mean 'scheme'? use the keys"),
        ({"pattern": "x", "observer_option": {}}, "did you mean 'observer_options'?"),
    ):
        with pytest.raises(UsageError, match=re.escape(needle)):
            parse_rules([bad])
    with pytest.raises(UsageError) as e:
        parse_rules([{"pattern": "x", "colour": "red"}])
    assert "did you mean" not in str(e.value)


def test_rules_files_json_and_toml(tmp_path):
    js = tmp_path / "r.json"
    js.write_text(json.dumps({"rules": [{"pattern": "lm_head", "scheme": "int8"}, "embed=skip"]}))
    assert [r.describe() for r in load_rules_file(str(js))] == ["lm_head=int8", "embed=skip"]
    toml = tmp_path / "r.toml"
    toml.write_text('[[rule]]\npattern = "x"\nscheme = "fp16"\n')
    assert load_rules_file(str(toml)) == (Rule("x", scheme="fp16"),)
    broken = tmp_path / "b.json"
    broken.write_text("[{")
    with pytest.raises(UsageError, match="does not parse"):
        load_rules_file(str(broken))
    obj = tmp_path / "o.json"
    obj.write_text('{"pattern": "x"}')
    with pytest.raises(UsageError, match="holds no list of rules"):
        load_rules_file(str(obj))
    with pytest.raises(UsageError, match="does not exist"):
        load_rules_file(str(tmp_path / "none.json"))


def test_a_rule_marks_plugins_per_module(engine):
    r = Rule.parse("blocks.*=int4-group,group_size=64,+outlier,+outlier.max_fraction=0.02")
    assert dict(r.scheme_options) == {"group_size": "64"}
    assert {k: dict(v) for k, v in r.plugins.items()} == {"outlier": {"max_fraction": "0.02"}}
    assert Rule.from_mapping({"pattern": "a", "scheme": "int8", "plugins": {"outlier": None}})
    for bad in ("x=int8,+outlier=1", "x=int8,+outlier.max_fraction", "x=int8,+"):
        with pytest.raises(UsageError):
            Rule.parse(bad)
    with pytest.raises(UsageError, match="'plugins' is"):
        Rule.from_mapping({"pattern": "a", "plugins": ["outlier"]})
    # validated by the plugin's options class, defaults filled in, into entry.options
    plan = engine.plan(
        demo_model(),
        scheme="int4-group",
        rules=["blocks.0.attn.q_proj=int4-group,+outlier.max_fraction=0.02"],
    )
    marked = {e.name: e.options["outlier"] for e in plan.selected if "outlier" in e.options}
    assert marked == {
        "blocks.0.attn.q_proj": {"threshold": 6.0, "max_fraction": 0.02, "int4": False}
    }
    with pytest.raises(UsageError, match=r"\+outlir names no plugin.*did you mean 'outlier'"):
        engine.plan(demo_model(), rules=["lm_head=int8,+outlir"])
    with pytest.raises(UsageError, match=r"max_fraction 2.0 is not in \(0, 1\]"):
        engine.plan(demo_model(), rules=["lm_head=int8,+outlier.max_fraction=2"])
    # the JSON form round-trips
    (back,) = parse_rules([json.loads(json.dumps(r.to_dict()))])
    assert back == r
