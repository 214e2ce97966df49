"""loading.py: real entry-point discovery with fake installed distributions (no pip needed),
isolated loads, the disable / strict switches and fixed plugin names."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from click.testing import CliRunner

from monoquant_core import (
    Engine,
    PluginConflictError,
    PluginLoadError,
    PluginLoadWarning,
)
from monoquant_core.cli import build_cli
from monoquant_core.testing import make_fake_distribution, mlp
from tests.helpers import SCHEME_PLUGIN


def _install(tmp_path, monkeypatch, name, eps, modules):
    root = make_fake_distribution(tmp_path / name, name, "1.2.3", eps, modules)
    monkeypatch.syspath_prepend(str(root))
    return root


def test_fake_distribution_scheme_is_discovered_and_used(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "monoquant-round8",
        {"round8": "mq_round8"},
        {"mq_round8": SCHEME_PLUGIN},
    )
    engine = Engine()
    reg = engine.schemes.entry("round8")
    assert (reg.plugin, reg.distribution, reg.version) == ("round8", "monoquant-round8", "1.2.3")
    x = torch.randn(3, 32)
    model, report = engine.quantize(mlp(), scheme="round8")
    assert {layer.scheme for layer in report.layers} == {"round8"}
    assert report.min_sqnr_db > 35
    out = CliRunner().invoke(build_cli(engine), ["plugins", "--json"])
    assert out.exit_code == 0, out.output
    names = {p["name"]: p for p in json.loads(out.output)["plugins"]}
    assert names["round8"]["distribution"] == "monoquant-round8"
    assert names["round8"]["components"] == {"scheme": ["round8"]}
    assert model(x).shape == (3, 10)


def test_builtins_come_from_our_own_entry_points(engine):
    for kind, name in [
        ("scheme", "int8"),
        ("observer", "minmax"),
        ("replacer", "linear"),
        ("serializer", "safetensors"),
        ("backend", "reference"),
    ]:
        reg = engine.registry(kind).entry(name)
        assert reg.distribution == "monoquant", (kind, name, reg.distribution)


def test_plugin_that_raises_on_import_warns_once_and_engine_works(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "monoquant-broken",
        {"broken": "mq_broken"},
        {"mq_broken": "raise RuntimeError('boom at import')\n"},
    )
    with pytest.warns(PluginLoadWarning) as rec:
        engine = Engine()
    msgs = [str(w.message) for w in rec if issubclass(w.category, PluginLoadWarning)]
    assert len(msgs) == 1
    assert "monoquant-broken 1.2.3" in msgs[0] and "boom at import" in msgs[0]
    assert "MONOQUANT_DISABLE_PLUGINS=broken" in msgs[0] and "\n" not in msgs[0]
    _, report = engine.quantize(mlp())
    assert [layer.name for layer in report.layers] == ["0.weight", "2.weight", "4.weight"]
    with pytest.raises(PluginLoadError, match="boom at import"):
        Engine(strict=True)
    monkeypatch.setenv("MONOQUANT_STRICT_PLUGINS", "1")
    with pytest.raises(PluginLoadError):
        Engine()


@pytest.mark.parametrize("blocked", ["broken", "monoquant-broken", "MONOQUANT_BROKEN"])
def test_disable_env_skips_plugin_without_importing_it(tmp_path, monkeypatch, blocked):
    _install(
        tmp_path,
        monkeypatch,
        "monoquant-broken",
        {"broken": "mq_broken"},
        {"mq_broken": "raise RuntimeError('boom')\n"},
    )
    monkeypatch.setenv("MONOQUANT_DISABLE_PLUGINS", f"something-else, {blocked}")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        engine = Engine()
    assert "broken" not in {p["name"] for p in engine.plugins()}


def test_name_clash_names_both_distributions(tmp_path, monkeypatch):
    clash = SCHEME_PLUGIN.replace('name = "round8"', 'name = "int8"')
    _install(tmp_path, monkeypatch, "monoquant-clash", {"clash": "mq_clash"}, {"mq_clash": clash})
    with pytest.raises(PluginConflictError) as e:
        Engine()
    msg = str(e.value)
    assert "scheme 'int8' is registered twice" in msg
    assert "distribution monoquant 0.1.0" in msg or "distribution monoquant " in msg
    assert "monoquant-clash 1.2.3" in msg and "MONOQUANT_DISABLE_PLUGINS" in msg


def test_misspelt_hook_is_an_error_naming_it(tmp_path, monkeypatch):
    src = SCHEME_PLUGIN.replace("def monoquant_register_schemes", "def monoquant_register_schems")
    _install(tmp_path, monkeypatch, "monoquant-typo", {"typo": "mq_typo"}, {"mq_typo": src})
    with pytest.raises(PluginLoadError, match="'monoquant_register_schems', which is not a Mono"):
        Engine()


def test_plugin_names_are_the_same_whatever_the_loading_path():
    """Through entry points or passed as objects, every built-in keeps its one name."""
    from monoquant_core.loading import iter_entry_points

    eps = {ep.name: ep for ep, dname, _ in iter_entry_points(set()) if dname == "monoquant"}
    assert {"gpt2-conv1d", "safetensors", "int4-group", "torch-cpu"} <= set(eps)
    objects = [ep.load() for ep in eps.values()]
    engine = Engine(plugins=objects, entry_points=False)
    assert set(engine.registries.plugins) == {"core", *eps}
    # and the name is what prefixes the generated CLI options and is written into files
    assert engine.replacers.entry("gpt2-conv1d").plugin == "gpt2-conv1d"
    assert engine.serializers.entry("safetensors").plugin == "safetensors"


def test_an_entry_point_named_unlike_its_plugin_is_a_load_error(tmp_path, monkeypatch):
    root = make_fake_distribution(
        tmp_path,
        "monoquant-misnamed",
        entry_points={"misnamed": "mq_misnamed"},
        modules={"mq_misnamed": "monoquant_plugin_name = 'other-name'\n"},
    )
    monkeypatch.syspath_prepend(str(root))
    with pytest.raises(PluginLoadError, match="'misnamed' .* names itself 'other-name'"):
        Engine(strict=True)
