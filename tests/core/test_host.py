"""host.py: the plugin host (plugins registered and named, their components collected with
failures reported, plugin listing, no state shared between hosts)."""

from __future__ import annotations

import types

import pytest

from monoquant_core import (
    Engine,
    PluginConflictError,
    PluginLoadError,
    PluginLoadWarning,
    hookimpl,
)
from monoquant_core.host import plugin_name
from monoquant_core.testing import mlp


def test_plugin_names():
    class My_Plugin:
        pass

    named = My_Plugin()
    assert plugin_name(named) == "my-plugin"
    named.monoquant_plugin_name = "Fixed_Name"
    assert plugin_name(named) == "fixed-name"
    assert plugin_name(types.ModuleType("pkg.sub.mq_round8")) == "mq-round8"


def test_two_plugins_with_one_name_are_a_conflict():
    class A:
        monoquant_plugin_name = "same"

    engine = Engine(plugins=[A()], entry_points=False)
    with pytest.raises(PluginConflictError, match="two plugins are named 'same'"):
        engine.register(A())
    with pytest.raises(PluginConflictError, match="two plugins are named 'int8'"):
        Engine().register(A(), name="int8")


def test_plugins_lists_components_hooks_and_origin():
    class Extra:
        monoquant_plugin_name = "extra"

        @hookimpl
        def monoquant_register_observers(self, register):
            from monoquant_plugins.minmax import MinMaxObserver

            class Other(MinMaxObserver):
                name = "other-minmax"

            register(Other)

        @hookimpl
        def monoquant_report(self, report):
            pass

    engine = Engine(plugins=[Extra()])
    listing = {p["name"]: p for p in engine.plugins()}
    assert listing["extra"] == {
        "name": "extra",
        "distribution": None,
        "version": None,
        "source": "argument",
        "hooks": ["monoquant_register_observers", "monoquant_report"],
        "components": {"observer": ["other-minmax"]},
    }
    assert listing["core"]["source"] == "core" and listing["core"]["distribution"] == "monoquant"
    assert listing["int8"]["components"] == {"scheme": ["int8"]}
    assert listing["outlier"]["components"]["options"] == ["outlier"]
    assert engine.plugin_info("extra").origin == "plugin 'extra'"


def test_a_plugin_registered_later_takes_part_in_later_runs():
    engine = Engine()
    seen = []

    class Late:
        @hookimpl
        def monoquant_module_done(self, entry):
            seen.append(entry.name)

    engine.quantize(mlp())
    engine.register(Late(), name="late")
    engine.quantize(mlp())
    assert seen == ["0", "2", "4"]


def test_bad_component_name_warns_and_skips_component():
    class BadName:
        @hookimpl
        def monoquant_register_schemes(self, register):
            from monoquant_plugins.int8 import Int8Scheme

            class Bad(Int8Scheme):
                name = "My_Scheme"

            register(Bad())

    with pytest.warns(PluginLoadWarning, match="kebab-case.*'my-scheme'"):
        engine = Engine(plugins=[BadName()])
    assert "My_Scheme" not in engine.schemes
    with pytest.raises(PluginLoadError):
        Engine(plugins=[BadName()], strict=True)


def test_register_hook_that_raises_warns():
    class Exploding:
        @hookimpl
        def monoquant_register_observers(self, register):
            raise ValueError("no observers today")

    with pytest.warns(PluginLoadWarning, match="exploding.*no observers today"):
        engine = Engine(plugins=[Exploding()])
    assert "minmax" in engine.observers


def test_bad_hook_signature_is_reported():
    class WrongArgs:
        @hookimpl
        def monoquant_register_schemes(self, register, extra):
            pass

    with pytest.raises(PluginLoadError, match="invalid hook implementation"):
        Engine(plugins=[WrongArgs()], strict=True)


def test_engines_share_no_state():
    class Extra:
        @hookimpl
        def monoquant_register_observers(self, register):
            from monoquant_plugins.minmax import MinMaxObserver

            class Other(MinMaxObserver):
                name = "other-minmax"

            register(Other)

    a = Engine()
    b = Engine(plugins=[Extra()])
    assert "other-minmax" in b.observers and "other-minmax" not in a.observers
    a.register(Extra(), name="extra")
    assert "other-minmax" in a.observers
    assert a.observers.entry("other-minmax").plugin == "extra"


def test_disable_argument_and_hermetic_engine():
    engine = Engine(disable=["int8"])
    assert "int8" not in engine.schemes and "minmax" in engine.observers
    bare = Engine(entry_points=False)
    assert bare.schemes.names() == [] and [p["name"] for p in bare.plugins()] == ["core"]
