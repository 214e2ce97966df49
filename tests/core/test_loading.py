"""loading.py: real entry-point discovery with fake installed distributions (no pip needed),
isolated loads, the disable / strict switches and fixed plugin names."""

from __future__ import annotations

import json
import sys
import textwrap
import time
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
from monoquant_core.loading import ImportInterrupted
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


def _load_warnings(rec) -> list[str]:
    return [str(w.message) for w in rec if issubclass(w.category, PluginLoadWarning)]


def test_name_clash_leaves_the_later_plugin_out_naming_both(tmp_path, monkeypatch):
    """A component name another plugin registered first: one warning naming both, the whole
    later plugin left out (its other components too), fatal only in strict mode."""
    clash = SCHEME_PLUGIN.replace('name = "round8"', 'name = "int8"') + textwrap.dedent(
        """
        from monoquant_plugins.minmax import MinMaxObserver

        class OtherObserver(MinMaxObserver):
            name = "clash-minmax"

        @hookimpl
        def monoquant_register_observers(register):
            register(OtherObserver)
        """
    )
    _install(tmp_path, monkeypatch, "monoquant-clash", {"clash": "mq_clash"}, {"mq_clash": clash})
    with pytest.warns(PluginLoadWarning) as rec:
        engine = Engine()
    (msg,) = _load_warnings(rec)
    assert "scheme 'int8' is registered twice" in msg and "\n" not in msg
    assert "distribution monoquant " in msg and "monoquant-clash 1.2.3" in msg
    assert "MONOQUANT_DISABLE_PLUGINS=clash" in msg
    assert "keeps working without plugin 'clash'" in msg
    assert engine.schemes.entry("int8").distribution == "monoquant"
    assert "clash-minmax" not in engine.observers  # registered before the clash: removed too
    assert "clash" not in engine.registries.plugins and not engine.pm.has_plugin("clash")
    assert [type(f) for f in engine.failures] == [PluginConflictError]
    _, report = engine.quantize(mlp())
    assert {layer.scheme for layer in report.layers} == {"int8"}
    with pytest.raises(PluginConflictError, match="scheme 'int8' is registered twice"):
        Engine(strict=True)


def test_replacer_for_a_taken_module_type_leaves_the_plugin_out(tmp_path, monkeypatch):
    src = textwrap.dedent(
        """
        from torch import nn
        from monoquant_core import hookimpl
        from monoquant_plugins.linear import LinearReplacer

        class MyLinear(LinearReplacer):
            name = "my-linear"

        @hookimpl
        def monoquant_register_replacers(register):
            register(MyLinear())
        """
    )
    _install(tmp_path, monkeypatch, "monoquant-mylin", {"mylin": "mq_mylin"}, {"mq_mylin": src})
    with pytest.warns(PluginLoadWarning, match="Linear has two replacers"):
        engine = Engine()
    assert "my-linear" not in engine.replacers
    assert engine.replacers.for_type(torch.nn.Linear).name == "linear"


def test_two_distributions_with_one_plugin_name_keep_the_first(tmp_path, monkeypatch):
    for dist in ("monoquant-dup-a", "monoquant-dup-b"):
        src = SCHEME_PLUGIN.replace('name = "round8"', f'name = "{dist[-5:]}"')
        _install(
            tmp_path,
            monkeypatch,
            dist,
            {"dup": f"mq_{dist[-5:].replace('-', '_')}"},
            {f"mq_{dist[-5:].replace('-', '_')}": src},
        )
    with pytest.warns(PluginLoadWarning) as rec:
        engine = Engine()
    (msg,) = _load_warnings(rec)
    assert "two plugins are named 'dup'" in msg
    assert "monoquant-dup-a 1.2.3" in msg and "monoquant-dup-b 1.2.3" in msg
    kept = engine.plugin_info("dup").distribution
    assert kept in msg.split(" and ")[0], msg  # the first one named is the one kept
    assert len([s for s in ("dup-a", "dup-b") if s in engine.schemes]) == 1
    with pytest.raises(PluginConflictError, match="two plugins are named 'dup'"):
        Engine(strict=True)


def test_misspelt_hook_leaves_the_plugin_out_naming_it(tmp_path, monkeypatch):
    src = SCHEME_PLUGIN.replace("def monoquant_register_schemes", "def monoquant_register_schems")
    _install(tmp_path, monkeypatch, "monoquant-typo", {"typo": "mq_typo"}, {"mq_typo": src})
    with pytest.warns(PluginLoadWarning) as rec:
        engine = Engine()
    (msg,) = _load_warnings(rec)
    assert "plugin 'typo' (distribution monoquant-typo 1.2.3) implements " in msg
    assert "'monoquant_register_schems', which is not a Mono Quant hook" in msg
    assert "did you mean 'monoquant_register_schemes'?" in msg
    assert "typo" not in engine.registries.plugins and not engine.pm.has_plugin("typo")
    _, report = engine.quantize(mlp())
    assert len(report.layers) == 3
    with pytest.raises(PluginLoadError, match="'monoquant_register_schems', which is not a Mono"):
        Engine(strict=True)


@pytest.mark.parametrize(
    "source, cause",
    [
        ("import sys\nsys.exit(3)\n", "it called sys.exit(3) while being imported"),
        ("import sys\nsys.exit()\n", "it called sys.exit(None) while being imported"),
        ("raise SystemExit('bye')\n", "it called sys.exit('bye') while being imported"),
    ],
)
def test_plugin_that_exits_on_import_is_a_load_failure(tmp_path, monkeypatch, source, cause):
    _install(
        tmp_path,
        monkeypatch,
        "monoquant-quitter",
        {"quitter": "mq_quitter"},
        {"mq_quitter": source},
    )
    with pytest.warns(PluginLoadWarning) as rec:
        engine = Engine()
    (msg,) = _load_warnings(rec)
    assert "plugin 'quitter' from monoquant-quitter 1.2.3 failed to load" in msg
    assert cause in msg and "MONOQUANT_DISABLE_PLUGINS=quitter" in msg
    assert len(engine.quantize(mlp())[1].layers) == 3
    with pytest.raises(PluginLoadError, match="sys.exit"):
        Engine(strict=True)


def test_ctrl_c_during_a_plugin_import_is_not_swallowed(tmp_path, monkeypatch):
    _install(
        tmp_path,
        monkeypatch,
        "monoquant-int",
        {"intr": "mq_intr"},
        {"mq_intr": "raise KeyboardInterrupt\n"},
    )
    with pytest.raises(KeyboardInterrupt) as e:
        Engine()
    assert isinstance(e.value, ImportInterrupted)
    assert str(e.value) == (
        "interrupted while importing plugin 'intr' (monoquant-int 1.2.3); "
        "MONOQUANT_DISABLE_PLUGINS=intr skips it"
    )


SLOW = "import time\ntime.sleep(float(__import__('os').environ['MQ_TEST_SLEEP']))\n"


def test_a_slow_import_prints_one_hint_line_while_it_lasts(tmp_path, monkeypatch, capfd):
    """A hanging import cannot be stopped from inside, but it is named on stderr after
    MONOQUANT_SLOW_IMPORT_S seconds with the value that skips it."""
    _install(tmp_path, monkeypatch, "monoquant-slow", {"slow": "mq_slow"}, {"mq_slow": SLOW})
    monkeypatch.setenv("MONOQUANT_SLOW_IMPORT_S", "0.2")
    monkeypatch.setenv("MQ_TEST_SLEEP", "1.0")
    engine = Engine()
    err = capfd.readouterr().err
    assert err == (
        "monoquant: plugin 'slow' (monoquant-slow 1.2.3) has been importing for 0.2 s; "
        "MONOQUANT_DISABLE_PLUGINS=slow skips it\n"
    ), err
    listing = {p["name"]: p for p in engine.plugins()}
    assert listing["slow"]["import_s"] >= 1.0 and listing["core"]["import_s"] is None
    # a fast import: the timer is cancelled, nothing is printed later
    monkeypatch.setenv("MQ_TEST_SLEEP", "0")
    monkeypatch.delitem(sys.modules, "mq_slow")
    Engine()
    time.sleep(0.4)
    assert capfd.readouterr().err == ""
    # 0 turns the hint off
    monkeypatch.setenv("MONOQUANT_SLOW_IMPORT_S", "0")
    monkeypatch.setenv("MQ_TEST_SLEEP", "0.4")
    monkeypatch.delitem(sys.modules, "mq_slow")
    Engine()
    assert capfd.readouterr().err == ""


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
