"""The test kit itself: fixtures, assertions, and contract suites that fail on broken plugins."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from monoquant_plugins.int8 import Int8Scheme
from monoquant_plugins.linear import LinearReplacer, QuantizedLinear
from monoquant_plugins.minmax import MinMaxObserver
from monoquant_plugins.safetensors_format import SafetensorsSerializer
from torch import nn

import monoquant_core.testing as kit
from monoquant_core import Backend, Engine, QParams, hookimpl
from monoquant_core.testing import (
    BackendContract,
    ObserverContract,
    ReplacerContract,
    SchemeContract,
    SerializerContract,
)
from monoquant_core.testing.engines import hermetic_engine
from tests.helpers import SCHEME_PLUGIN

pytest_plugins = ["monoquant_core.testing.plugin"]

# ---------------------------------------------------------------------------- fixtures


def test_package_import_does_not_import_pytest():
    code = "import sys, monoquant_core.testing; print('pytest' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False", out.stderr


def test_mq_engine_is_fresh_strict_and_ignores_the_environment(mq_engine, monkeypatch):
    monkeypatch.setenv("MONOQUANT_DISABLE_PLUGINS", "int8")
    assert "int8" in mq_engine.schemes and mq_engine.strict
    assert "int8" in hermetic_engine().schemes
    assert "int8" not in Engine().schemes  # a plain Engine honours the variable


class TestMqEngineOverrides:
    @pytest.fixture
    def mq_entry_points(self):
        return False

    @pytest.fixture
    def mq_plugins(self):
        from monoquant_plugins import int8

        return (int8,)

    def test_only_the_given_plugins(self, mq_engine):
        assert mq_engine.schemes.names() == ["int8"] and mq_engine.observers.names() == []


def test_fake_distribution_is_discovered_and_distributions_filter(fake_distribution):
    fake_distribution(
        "monoquant-round8", {"round8": "mq_kit_round8"}, {"mq_kit_round8": SCHEME_PLUGIN}
    )
    reg = hermetic_engine().schemes.entry("round8")
    assert (reg.distribution, reg.version) == ("monoquant-round8", "0.1.0")
    assert "round8" not in hermetic_engine(distributions=()).schemes
    only = hermetic_engine(distributions=["monoquant-round8"])
    assert "round8" in only.schemes and "int8" in only.schemes
    assert "mq_kit_round8" in sys.modules


def test_fake_distribution_modules_are_forgotten_after_the_test():
    assert "mq_kit_round8" not in sys.modules


def test_tiny_models_are_seeded_and_run(tiny_models):
    assert set(tiny_models) == {"mlp", "outliers", "conv", "embedding", "transformer", "wrapper"}
    for tm in tiny_models.values():
        a, b = tm.build(), tm.build()
        assert all(torch.equal(a.state_dict()[k], v) for k, v in b.state_dict().items())
        with torch.no_grad():
            assert torch.isfinite(a(tm.inputs)).all(), tm.name
    plain, outliers = tiny_models["mlp"].build(), tiny_models["outliers"].build()
    assert outliers[0].weight.abs().max() > 10 * plain[0].weight.abs().max()


def test_assert_sqnr_reports_the_measured_value(assert_sqnr):
    x = torch.linspace(-1, 1, 100)
    assert assert_sqnr(x, x + 1e-3, 40.0) > 40.0
    with pytest.raises(AssertionError, match=r"head: SQNR \d+\.\d\d dB < floor 80\.00 dB"):
        assert_sqnr(x, x + 1e-3, 80.0, "head")
    with pytest.raises(AssertionError, match="shape"):
        assert_sqnr(x, x[:5], 1.0)


class LossySerializer(SafetensorsSerializer):
    """Reads back every scale nudged by one float16 step (a subtle format bug)."""

    name = "lossy"
    suffixes = (".lossy",)

    def sniff(self, path):
        return path.endswith(".lossy") and super().sniff(path)

    def read(self, path):
        art = super().read(path)
        for qt in art.qtensors.values():
            qt.scale = qt.scale * (1 + 2**-10)
        return art


class LossyPlugin:
    @hookimpl
    def monoquant_register_serializers(self, register):
        register(LossySerializer())


def test_assert_roundtrip_exact(assert_roundtrip_exact, tiny_models):
    engine = Engine(plugins=[LossyPlugin()])
    tm = tiny_models["transformer"]
    qmodel, _ = engine.quantize(tm.build(), scheme="int4-group")
    loaded = assert_roundtrip_exact(qmodel, tm.build, tm.inputs, engine, ["safetensors"])
    assert set(loaded) == {"safetensors"}
    with pytest.raises(AssertionError, match="lossy: .*scale: values differ"):
        assert_roundtrip_exact(qmodel, tm.build, tm.inputs, engine)


def test_cli_runner_runs_the_console_script(cli_runner, mq_engine):
    res = cli_runner.invoke("plugins", "--json")
    assert res.exit_code == 0, res.output
    names = {p["name"] for p in json.loads(res.stdout)["plugins"]}
    assert {"int8", "safetensors", "reference"} <= names
    res = cli_runner.invoke("plan", "--demo", engine=mq_engine)
    assert res.exit_code == 0 and "lm_head" in res.output
    assert cli_runner.invoke("nope").exit_code == 2


def test_contracts_load_lazily():
    assert kit.SchemeContract is SchemeContract
    with pytest.raises(AttributeError):
        kit.NoSuchContract  # noqa: B018


# ---------------------------------------------------------------------------- contracts fail
# Each suite is run by hand on a deliberately broken plugin: the kit must catch the bug.

FAILED = (AssertionError, pytest.fail.Exception)


def _plugin(kind, *components):
    class Plugin:
        monoquant_plugin_name = "broken-for-kit"

    def register_all(self, register):
        for c in components:
            register(c)

    setattr(Plugin, f"monoquant_register_{kind}", hookimpl(register_all))
    return Plugin()


class NoisyScheme(Int8Scheme):
    """Adds a random offset to its scales and no validation of group sizes."""

    name = "noisy"

    def quantize(self, weight, qparams, spec, config):
        noisy = QParams(qparams.scale * (1 + 0.01 * torch.rand(())), qparams.zero_point)
        return super().quantize(weight, noisy, spec, config)


class InPlaceScheme(Int8Scheme):
    name = "in-place"

    def quantize(self, weight, qparams, spec, config):
        qt = super().quantize(weight, qparams, spec, config)
        weight.mul_(1.0)  # harmless value-wise ...
        weight[..., 0] = 0.0  # ... but this is not
        return qt


def _scheme_suite(component, **attrs):
    cls = type(
        "Suite",
        (SchemeContract,),
        {
            "scheme": component.name,
            "sqnr_floor_db": 40.0,
            "plugins": (_plugin("schemes", component),),
            **attrs,
        },
    )
    return cls()


def test_scheme_contract_catches_nondeterminism():
    suite = _scheme_suite(NoisyScheme())
    with pytest.raises(FAILED, match="second quantization"):
        suite.test_deterministic()
    suite.test_sqnr_floor_on_tiny_models(suite.make_engine())  # still accurate


def test_scheme_contract_catches_an_optimistic_floor():
    suite = _scheme_suite(NoisyScheme(), sqnr_floor_db=60.0)
    with pytest.raises(FAILED, match="< floor 60.00 dB"):
        suite.test_sqnr_floor_on_tiny_models(suite.make_engine())


def test_scheme_contract_catches_modified_inputs():
    suite = _scheme_suite(InPlaceScheme())
    with pytest.raises(FAILED, match="modified the float weight"):
        suite.test_inputs_are_not_modified(suite.make_engine())


def test_scheme_contract_catches_unvalidated_group_sizes():
    from dataclasses import dataclass

    from monoquant_plugins.int8 import Int8Config

    from monoquant_core import Capabilities

    @dataclass(frozen=True)
    class GroupConfig(Int8Config):
        group_size: int = 32

    class Unvalidated(Int8Scheme):
        name = "unvalidated"
        config_class = GroupConfig
        capabilities = Capabilities(bits=(8,), group_sizes=(32, 64))

    suite = _scheme_suite(Unvalidated())
    with pytest.raises(FAILED, match="DID NOT RAISE"):
        suite.test_undeclared_group_sizes_fail_before_any_compute(suite.make_engine())


class ZeroScaleObserver(MinMaxObserver):
    """Returns scale 0 for an all-zero group and never complains about missing data."""

    name = "zero-scale"

    def update(self, x):
        super().update(x)

    def qparams(self):
        if self.min is None:
            return QParams(torch.ones(1, 1))
        qp = super().qparams()
        amax = torch.maximum(-self.min, self.max)
        return QParams(torch.where(amax > 0, qp.scale, 0.0), qp.zero_point)


def _observer_suite():
    cls = type(
        "Suite",
        (ObserverContract,),
        {
            "observer": "zero-scale",
            "sqnr_floor_db": 40.0,
            "plugins": (_plugin("observers", ZeroScaleObserver),),
        },
    )
    return cls()


def test_observer_contract_catches_zero_scales_and_silent_empty_observers():
    suite = _observer_suite()
    engine = suite.make_engine()
    suite.test_qparams_have_the_spec_shape(engine)
    with pytest.raises(FAILED, match="scales must be positive"):
        suite.test_all_zero_tensor_is_exact(engine)
    with pytest.raises(FAILED, match="DID NOT RAISE"):
        suite.test_qparams_without_data_raise(engine)


class Float32Linear(QuantizedLinear):
    def forward(self, x):
        return super().forward(x).float()


class MyLinear(nn.Module):
    """A layer type of a user's own, handled by the sloppy replacer below."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 16) * 0.1)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)

    def forward(self, x):
        return nn.functional.linear(x, self.weight, self.bias)


class SloppyReplacer(LinearReplacer):
    """Returns float32 whatever the input dtype, and zeroes the original's bias."""

    name = "sloppy"
    module_types = (MyLinear,)

    def replace(self, module, qweights, backend, scheme):
        out_features, in_features = module.weight.shape
        new = Float32Linear(
            in_features, out_features, qweights["weight"], module.bias, backend, scheme
        )
        with torch.no_grad():
            module.bias.zero_()
        return new


def test_replacer_contract_catches_dtype_and_side_effects():
    class Suite(ReplacerContract):
        replacer = "sloppy"
        sqnr_floor_db = 30.0
        plugins = (_plugin("replacers", SloppyReplacer()),)

        def build(self):
            return MyLinear()

        def example_input(self):
            return torch.randn(3, 16)

    suite = Suite()
    engine = suite.make_engine()
    with pytest.raises(FAILED, match="bfloat16 input gave a torch.float32 output"):
        suite.test_low_precision_input_keeps_its_dtype(engine)
    with pytest.raises(FAILED, match="tensor 'bias' of the input model changed"):
        suite.test_original_module_is_left_alone(engine)


class BiaslessBackend(Backend):
    name = "biasless"
    priority = -1

    def available(self):
        return True

    def linear(self, x, prepared, bias):
        qt, scheme = prepared
        return nn.functional.linear(x, scheme.dequantize(qt).to(x.dtype))


class ExplodingBackend(BiaslessBackend):
    name = "exploding"

    def available(self):
        raise OSError("no driver")


def test_backend_contract_catches_a_dropped_bias_and_a_raising_available():
    def suite(component):
        cls = type(
            "Suite",
            (BackendContract,),
            {"backend": component.name, "plugins": (_plugin("backends", component),)},
        )
        return cls()

    biasless = suite(BiaslessBackend())
    with pytest.raises(FAILED, match="bias=True"):
        biasless.test_linear_matches_reference(biasless.make_engine())
    exploding = suite(ExplodingBackend())
    with pytest.raises(OSError, match="no driver"):
        exploding.test_available_never_raises(exploding.make_engine())


class RoundingSerializer(SafetensorsSerializer):
    """Stores bfloat16 tensors as float16 (a silent precision change)."""

    name = "rounding"
    suffixes = (".rounding",)

    def sniff(self, path):
        return path.endswith(".rounding") and super().sniff(path)

    def write(self, artifact, path):
        tensors = {
            k: t.half() if t.dtype == torch.bfloat16 else t for k, t in artifact.tensors.items()
        }
        super().write(dataclasses.replace(artifact, tensors=tensors), path)


def test_serializer_contract_catches_changed_dtypes(tmp_path):
    cls = type(
        "Suite",
        (SerializerContract,),
        {"serializer": "rounding", "plugins": (_plugin("serializers", RoundingSerializer()),)},
    )
    suite = cls()
    with pytest.raises(FAILED, match="bf16: torch.float16"):
        suite.test_artifact_round_trip_is_exact(suite.make_engine(), tmp_path)
