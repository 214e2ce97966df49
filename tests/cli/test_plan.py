"""cli/plan.py: ``monoquant plan`` for a model (``--demo`` / ``--model``) and for a checkpoint
SOURCE (headers only), as a table or JSON."""

from __future__ import annotations

import json

from tests.helpers import SMALL_SELECTED, cli_ok


def test_plan_json(cli):
    res = cli("plan", "--demo", "--only", "blocks.0.*", "--json")
    assert res.exit_code == 0, res.output
    entries = json.loads(res.output)["entries"]
    assert [e["name"] for e in entries if e["action"] == "quantize"] == [
        *(f"blocks.0.attn.{p}_proj" for p in "qkvo"),
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
    ]


def test_plan_table_and_json(cli, small_file):
    src, sd = small_file
    text = cli_ok(cli("plan", src))
    print(text)
    assert f"{len(SMALL_SELECTED)} of {len(sd)} tensors will be quantized" in text
    assert "'bias' is not a weight" in text
    assert "embedding: kept in float" in text
    assert "output head" in text
    assert "1-D tensor" in text
    data = json.loads(
        cli_ok(cli("plan", src, "--json", "--rule", "lm_head=int8", "--skip", "*.0.*"))
    )
    action = {e["name"]: (e["action"], e["scheme"]) for e in data["entries"]}
    assert action["lm_head.weight"] == ("quantize", "int8")
    assert action["model.layers.0.mlp.up_proj.weight"][0] == "skip"
    assert action["model.layers.1.mlp.up_proj.weight"] == ("quantize", "int8")


def test_plan_of_a_model_factory_needs_no_weights(cli, model_args):
    text = cli_ok(cli("plan", *model_args[:2]))
    assert "3 of 3 modules will be quantized." in text
    for name in ("0", "2", "4"):
        assert f"\n{name} " in text


def test_expect_batch_warnings_and_kernels_in_the_plan(cli):
    text = cli_ok(cli("plan", "--demo", "--backend", "reference", "--expect-batch", "4"))
    assert "warning: reference is expected slower than a float32 nn.Linear at M=4" in text
    assert "at M=128" not in text  # only the rows asked for
    entries = json.loads(cli_ok(cli("plan", "--demo", "--json")))["entries"]
    fc1 = next(e for e in entries if e["name"] == "blocks.0.mlp.fc1")
    assert fc1["kernels"] and all(k.startswith(("M ", "any M")) for k in fc1["kernels"])
    res = cli("plan", "--demo", "--expect-batch", "0")
    assert res.exit_code == 2  # click's usage error: not a positive number
