"""cli/info.py: ``monoquant plugins`` and ``monoquant env``, as tables and as JSON."""

from __future__ import annotations

import json

import torch

import monoquant_core as mq
from tests.helpers import cli_ok


def test_plugins_lists_builtins(cli):
    res = cli("plugins")
    assert res.exit_code == 0 and "safetensors" in res.output and "monoquant" in res.output
    data = json.loads(cli("plugins", "--json").output)
    assert {p["name"] for p in data["plugins"]} >= {"int8", "minmax", "linear", "reference"}


def test_plugins_table_shows_components_or_hooks(cli, engine):
    rows = {line.split()[0]: line for line in cli_ok(cli("plugins")).splitlines()[2:]}
    assert "scheme: int8" in rows["int8"] and "backend: reference" in rows["reference"]
    assert rows["core"].split() == ["core", "monoquant", mq.__version__, "quantize_weights"]
    data = json.loads(cli_ok(cli("plugins", "--json")))
    assert data["failed"] == [] and len(data["plugins"]) == len(engine.plugins())


def test_env_text_and_json(cli, engine):
    data = json.loads(cli_ok(cli("env", "--json")))
    assert data["monoquant"] == mq.__version__ and data["torch"] == torch.__version__
    assert [b["name"] for b in data["backends"]][-1] == "reference"  # lowest priority last
    assert {b["name"] for b in data["backends"]} == set(engine.backends.names())
    text = cli_ok(cli("env"))
    assert f"monoquant: {mq.__version__}\n" in text and "threads: " in text
    table = text.split("\n\n", 1)[1].splitlines()
    assert table[0].split() == ["backend", "priority", "available", "devices", "numerics"]
    assert any(line.startswith("reference") and " yes " in line for line in table[2:])
