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


def test_two_plugins_with_one_name_leave_the_second_out():
    """A warning naming both (an error in strict mode); the first keeps working."""

    class A:
        monoquant_plugin_name = "same"

    first = A()
    engine = Engine(plugins=[first], entry_points=False)
    with pytest.warns(PluginLoadWarning, match="two plugins are named 'same'") as rec:
        engine.register(A())
    assert "keeps working without the second plugin 'same'" in str(rec[0].message)
    assert engine.plugin_info("same").plugin is first
    assert engine.pm.get_plugin("same") is first
    with pytest.warns(PluginLoadWarning, match="two plugins are named 'same'"):
        twice = Engine(plugins=[A(), A()], entry_points=False)
    assert [type(f) for f in twice.failures] == [PluginConflictError]
    strict = Engine(strict=True)
    with pytest.raises(PluginConflictError, match="two plugins are named 'int8'"):
        strict.register(A(), name="int8")
    assert strict.schemes.entry("int8").plugin == "int8"


def test_a_second_plugin_of_a_taken_name_does_not_touch_the_first_ones_components():
    from monoquant_plugins.minmax import MinMaxObserver

    class Obs(MinMaxObserver):
        name = "mine"

    class First:
        monoquant_plugin_name = "mine"

        @hookimpl
        def monoquant_register_observers(self, register):
            register(Obs)

    class Second(First):
        pass

    engine = Engine(plugins=[First()], entry_points=False)
    with pytest.warns(PluginLoadWarning, match="two plugins are named 'mine'"):
        engine.register(Second())
    assert engine.observers.entry("mine").component is Obs
    assert type(engine.plugin_info("mine").plugin) is First and len(engine.failures) == 1


def test_one_object_under_two_names_is_left_out_without_a_traceback():
    class B:
        monoquant_plugin_name = "b"

    obj = B()
    engine = Engine(plugins=[obj], entry_points=False)
    with pytest.warns(PluginLoadWarning, match="plugin 'b2' cannot be registered"):
        engine.register(obj, name="b2")
    assert "b2" not in engine.registries.plugins


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
        "import_s": None,
    }
    assert listing["int8"]["import_s"] >= 0.0  # loaded from its entry point
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


@pytest.mark.parametrize("exc", [RuntimeError("bad table"), SystemExit(2)])
def test_a_registration_hook_that_raises_or_exits_is_reported_not_fatal(exc):
    class Raising:
        monoquant_plugin_name = "raising"

        @hookimpl
        def monoquant_register_schemes(self, register):
            raise exc

    with pytest.warns(PluginLoadWarning, match="plugin 'raising' failed in monoquant_register_"):
        engine = Engine(plugins=[Raising()])
    assert f"{type(exc).__name__}" in str(engine.failures[0])
    assert len(engine.quantize(mlp())[1].layers) == 3
    with pytest.raises(PluginLoadError, match="failed in monoquant_register_schemes"):
        Engine(plugins=[Raising()], strict=True)
