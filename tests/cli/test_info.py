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


def test_plugins_json_has_import_times_and_the_text_names_slow_imports(cli, monkeypatch):
    data = {p["name"]: p for p in json.loads(cli_ok(cli("plugins", "--json")))["plugins"]}
    assert data["core"]["import_s"] is None  # not an entry point
    assert isinstance(data["int8"]["import_s"], float) and data["int8"]["import_s"] >= 0
    assert "slow to import" not in cli_ok(cli("plugins"))
    monkeypatch.setenv("MONOQUANT_SLOW_IMPORT_S", "1e-9")  # every import counts as slow
    slow = [ln for ln in cli_ok(cli("plugins")).splitlines() if ln.startswith("slow to import")]
    assert (
        "slow to import: plugin 'int8' took 0.0 s; MONOQUANT_DISABLE_PLUGINS=int8 skips it" in slow
    )


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
