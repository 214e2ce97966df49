"""registry.py: validated registries stamped with their plugin, replacers found along the MRO,
and how a backend is chosen for a weight (with the reasons better-ranked ones were not)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from monoquant_core import (
    Capabilities,
    CapabilityError,
    Engine,
    PluginConflictError,
    PluginLoadError,
    UsageError,
    hookimpl,
)
from monoquant_core.components import WeightInfo
from monoquant_core.qtensor import QuantSpec
from monoquant_core.registry import (
    Registered,
    Registries,
    Registry,
    ReplacerRegistry,
    choose_backend,
    ranked_backends,
    safe_available,
)
from monoquant_core.testing import mlp
from tests.helpers import (
    Conv1D,
    FakeGpuBackend,
    PickyBackend,
    RaisingBackend,
    cli_one_line_error,
    one_line,
)


def _reg(kind, name, component, plugin="p", dist=None):
    return Registered(kind, name, component, plugin, dist, "1.0" if dist else None)


def test_registry_lookup_and_errors_list_what_is_there():
    reg = Registry("scheme")
    reg.add(_reg("scheme", "b-scheme", "B"))
    reg.add(_reg("scheme", "a-scheme", "A"))
    assert reg.names() == ["a-scheme", "b-scheme"] and [r.name for r in reg] == reg.names()
    assert reg.get("a-scheme") == "A" and "b-scheme" in reg and len(reg) == 2
    with pytest.raises(UsageError, match=r"unknown scheme 'c' \(available: a-scheme, b-scheme\)"):
        reg.get("c")
    with pytest.raises(UsageError, match=r"unknown observer 'x' \(available: \(none installed\)\)"):
        Registry("observer").get("x")


def test_names_must_be_kebab_case_and_unique_naming_both_origins():
    reg = Registry("scheme")
    with pytest.raises(PluginLoadError, match="'My_Scheme'.*kebab-case.*'my-scheme'"):
        reg.add(_reg("scheme", "My_Scheme", object()))
    reg.add(_reg("scheme", "int8", object(), "int8", "monoquant"))
    with pytest.raises(PluginConflictError) as e:
        reg.add(_reg("scheme", "int8", object(), "clash", "monoquant-clash"))
    msg = str(e.value)
    assert "by plugin 'int8' (distribution monoquant 1.0) and by plugin 'clash'" in msg
    assert "MONOQUANT_DISABLE_PLUGINS=clash (or int8)" in msg


class _Rep:
    def __init__(self, *types):
        self.module_types = types


def test_replacers_are_found_along_the_mro_and_by_qualified_name():
    class MyLinear(nn.Linear):
        pass

    reps = ReplacerRegistry()
    reps.add(_reg("replacer", "linear", _Rep(nn.Linear)))
    reps.add(_reg("replacer", "gpt2", _Rep("transformers.pytorch_utils.Conv1D")))
    assert reps.for_type(MyLinear).name == "linear"
    assert reps.for_type(nn.Conv2d) is None
    assert reps.for_type(Conv1D).name == "gpt2"
    assert reps.handled_names() == ["Conv1D", "Linear"]
    with pytest.raises(PluginConflictError, match=r"torch.nn.modules.linear.Linear has two"):
        reps.add(_reg("replacer", "other", _Rep(nn.Linear), "other"))
    with pytest.raises(PluginLoadError, match="without module_types"):
        reps.add(_reg("replacer", "bare", _Rep()))


def test_registries_bundle_gives_each_kind():
    r = Registries()
    for kind in ("observer", "scheme", "replacer", "serializer", "backend", "options"):
        assert r.of(kind).kind == kind
    assert isinstance(r.of("replacer"), ReplacerRegistry)


# --------------------------------------------------------------------------- backends


class Backends:
    @hookimpl
    def monoquant_register_backends(self, register):
        register(FakeGpuBackend())
        register(PickyBackend())
        register(RaisingBackend())


def test_backend_choice_is_data_with_reasons():
    engine = Engine(plugins=[Backends()], disable=["torch-cpu"])
    plan = engine.plan(mlp(dims=(32, 64, 10)))
    first, last = plan.get("0"), plan.get("2")
    assert first.backend == "picky"
    assert last.backend == "reference"
    choice = [n for n in last.notes if not n.startswith("warning:")]
    assert choice[0] == "picky: N % 16 != 0"  # highest priority first
    assert choice[-1].endswith(", using reference")
    assert any(n.startswith("warning: reference is expected slower") for n in last.notes)
    assert any("fake-gpu: no CUDA device found" in n for n in choice)
    assert any("raising: available() raised OSError: driver exploded" in n for n in choice)
    model, _ = engine.quantize(mlp(dims=(32, 64, 10)))
    assert model[0].backend.name == "picky" and model[2].backend.name == "reference"


class Int4OnlyBackend(PickyBackend):
    name = "int4-only"
    priority = 30
    capabilities = Capabilities(schemes=("int4-group",), activations=("dynamic",))

    def available(self):
        return "needs a special CPU"


def test_backends_not_meant_for_a_weight_are_passed_over_silently():
    class Plugin:
        @hookimpl
        def monoquant_register_backends(self, register):
            register(Int4OnlyBackend())

    engine = Engine(plugins=[Plugin()])
    int8 = engine.plan(mlp(dims=(256, 64, 10)), scheme="int8").get("0")
    assert not any("int4-only" in n for n in int8.notes), int8.notes  # not meant for int8
    weight_only = engine.plan(mlp(dims=(256, 64, 10)), scheme="int4-group").get("0")
    assert not any("int4-only" in n for n in weight_only.notes)  # nor for weight-only int4
    w4a8 = engine.plan(
        mlp(dims=(256, 64, 10)), scheme="int4-group", scheme_options={"activations": "dynamic"}
    ).get("0")
    # named first; ", using X" ends the note of the last backend passed over (cpu-vnni's and
    # torch-cpu's follow where this CPU lacks AVX-512 VNNI)
    assert w4a8.notes[0].startswith("int4-only: needs a special CPU"), w4a8.notes
    assert any(f", using {w4a8.backend}" in n for n in w4a8.notes), w4a8.notes
    assert Int4OnlyBackend.capabilities.to_dict()["schemes"] == ["int4-group"]


def test_forced_backend_errors_name_what_is_missing():
    engine = Engine(plugins=[Backends()], disable=["torch-cpu", "cpu-vnni"])
    with pytest.raises(CapabilityError, match="'fake-gpu' is not available here: no CUDA device"):
        engine.configure(backend="fake-gpu")
    with pytest.raises(UsageError, match=r"unknown backend 'tpu' \(available: fake-gpu, picky"):
        engine.configure(backend="tpu")
    with pytest.raises(CapabilityError, match="'picky' cannot run this weight: N % 16 != 0"):
        engine.plan(mlp(dims=(32, 64, 10)), backend="picky")
    plan = engine.plan(mlp(dims=(32, 64, 10)), backend="reference")
    assert {e.backend for e in plan.selected} == {"reference"}


def test_unknown_names_list_the_available_ones(engine):
    with pytest.raises(UsageError) as e:
        engine.quantize(mlp(), scheme="int3")
    assert "unknown scheme 'int3' (available: " in str(e.value)
    assert "int8" in str(e.value)
    with pytest.raises(UsageError, match=r"unknown observer 'hist' \(available: histogram, minmax"):
        engine.quantize(mlp(), observer="hist")
    with pytest.raises(UsageError, match="unknown option 'bits' for scheme 'int8'"):
        engine.quantize(mlp(), scheme_options={"bits": 4})


@pytest.mark.parametrize(
    "kind, typo, meant",
    [
        ("scheme", "int4-grup", "int4-group"),
        ("scheme", "INT8", "int8"),
        ("observer", "histgram", "histogram"),
        ("backend", "torch_cpu", "torch-cpu"),
    ],
)
def test_a_misspelt_name_gets_a_did_you_mean(engine, kind, typo, meant):
    with pytest.raises(UsageError) as e:
        engine.registry(kind).get(typo)
    msg = one_line(e.value)
    assert f"unknown {kind} {typo!r}" in msg and f"fix: did you mean {meant!r}? " in msg, msg


def test_a_name_close_to_nothing_gets_no_guess(engine):
    with pytest.raises(UsageError) as e:
        engine.registry("scheme").get("zzzzzz")
    assert "did you mean" not in str(e.value)


def test_cli_names_the_misspelt_scheme_observer_and_backend(cli):
    for flag, typo, meant in [
        ("--scheme", "int4_group", "int4-group"),
        ("--observer", "minmaxx", "minmax"),
        ("--backend", "refrence", "reference"),
    ]:
        cli_one_line_error(cli("plan", "--demo", flag, typo), f"did you mean {meant!r}?")


def test_discard_plugin_removes_its_components_and_module_types():
    reps = ReplacerRegistry()
    reps.add(_reg("replacer", "linear", _Rep(nn.Linear), "linear"))
    reps.add(_reg("replacer", "conv", _Rep(nn.Conv2d), "conv"))
    reps.discard_plugin("linear")
    assert reps.names() == ["conv"] and reps.for_type(nn.Linear) is None
    reps.add(_reg("replacer", "other", _Rep(nn.Linear), "other"))  # the type is free again
    assert reps.for_type(nn.Linear).name == "other"


def _backends(*components):
    reg = Registry("backend")
    for c in components:
        reg.add(_reg("backend", c.name, c))
    return reg


def _info(shape=(32, 64), scheme="int8", activations="none", device="cpu"):
    return WeightInfo(scheme, QuantSpec(8, True), shape, torch.float32, device, activations)


class Plain(PickyBackend):
    name = "plain"
    priority = 0

    def supports(self, info):
        return None


def test_choose_backend_by_priority_with_a_note_per_passed_over_backend():
    reg = _backends(Plain(), PickyBackend(), FakeGpuBackend(), RaisingBackend())
    assert choose_backend(reg, _info((32, 64))) == ("picky", [])  # the best one: no notes
    name, notes = choose_backend(reg, _info((33, 64)))
    assert name == "plain"
    assert notes == [
        "picky: N % 16 != 0",
        "fake-gpu: no CUDA device found",
        "raising: available() raised OSError: driver exploded, using plain",
    ]


def test_choose_backend_skips_other_devices_and_kinds_silently_and_fails_with_the_reasons():
    only_int4 = Int4OnlyBackend()
    reg = _backends(only_int4, PickyBackend())
    assert choose_backend(reg, _info((32, 64), "int8")) == ("picky", [])
    assert choose_backend(reg, _info((32, 64), "int4-group", "dynamic")) == (
        "picky",
        ["int4-only: needs a special CPU, using picky"],
    )
    with pytest.raises(CapabilityError) as e:
        choose_backend(reg, _info((33, 64)))
    assert "no installed backend can run a int8 weight of shape (33, 64) on cpu" in str(e.value)
    assert "(picky: N % 16 != 0)" in str(e.value)
    with pytest.raises(CapabilityError, match="none registered for this device"):
        choose_backend(reg, _info(device="cuda"))


def test_a_forced_backend_must_support_the_weight():
    reg = _backends(Plain(), PickyBackend())
    assert choose_backend(reg, _info((33, 64)), forced="plain") == ("plain", [])
    with pytest.raises(CapabilityError, match="'picky' cannot run this weight: N % 16 != 0"):
        choose_backend(reg, _info((33, 64)), forced="picky")
    with pytest.raises(UsageError, match="unknown backend 'nope'"):
        choose_backend(reg, _info(), forced="nope")


def test_ranked_backends_are_the_available_ones_best_first():
    reg = _backends(Plain(), PickyBackend(), FakeGpuBackend(), RaisingBackend(), Int4OnlyBackend())
    assert [b.name for b in ranked_backends(reg)] == ["picky", "plain"]


def test_safe_available_never_raises():
    assert safe_available(Plain()) is True
    assert safe_available(FakeGpuBackend()) == "no CUDA device found"
    assert safe_available(RaisingBackend()) == "available() raised OSError: driver exploded"

    class Falsy(Plain):
        def available(self):
            return False

    assert safe_available(Falsy()) == "not available on this machine"
