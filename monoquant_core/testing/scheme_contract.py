"""``SchemeContract``: the tests every quantization scheme must pass."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from ..capabilities import Capabilities
from ..components import Scheme
from ..engine import Engine
from ..errors import CapabilityError, FormatError, MonoQuantError
from ..metrics import sqnr_db
from ..options import config_to_dict
from ..qtensor import QTensor
from ..quantized_module import QuantizedModule
from .asserts import assert_qtensor_equal, assert_roundtrip_exact, assert_sqnr
from .contract_base import (
    Contract,
    QuantizeSpy,
    assert_unchanged,
    check_config_class,
    state_snapshot,
)
from .models import mlp, tiny_models

__all__ = ["SchemeContract"]


class SchemeContract(Contract):
    """Contract suite for a quantization scheme.

    Subclass it in a test module (the subclass name must start with ``Test``) and set at least
    ``scheme`` and ``sqnr_floor_db``::

        from monoquant_core.testing import SchemeContract

        class TestNf4Contract(SchemeContract):
            scheme = "nf4"
            sqnr_floor_db = 18.0

    Every test runs on a fresh strict Engine (see :class:`Contract` for ``plugins``,
    ``entry_points`` and ``distributions``). To opt out of one inherited test, set it to None
    in the subclass (``test_checkpoint_mode = None``) and say why in a comment.

    Attributes:
        scheme: the registered name of the scheme under test.
        sqnr_floor_db: the accuracy the scheme promises with ``scheme_options``: every weight
            of the tiny models ``floor_models`` reaches this SQNR (dB) after a round trip
            through ``quantize`` and the scheme's ``dequantize``.
        scheme_options: options for every test (default: the scheme's defaults).
        observer: the observer to use (default: the scheme's ``default_observer``).
        group_size_option: the config field that sets the group size (if the scheme has one).
        undeclared_group_sizes: candidates for "a group size the scheme does not declare";
            those in ``capabilities.group_sizes`` are left out.
        floor_models: :func:`~monoquant_core.testing.models.tiny_models` names whose weights
            must reach ``sqnr_floor_db`` (measured like the report: against the scheme's
            ``dequantize``).
        roundtrip_models: tiny models saved and loaded through every serializer.
    """

    scheme: ClassVar[str] = ""
    sqnr_floor_db: ClassVar[float | None] = None
    scheme_options: ClassVar[dict[str, Any]] = {}
    observer: ClassVar[str | None] = None
    group_size_option: ClassVar[str] = "group_size"
    undeclared_group_sizes: ClassVar[tuple[int, ...]] = (3, 24, 48, 100, 4096)
    floor_models: ClassVar[tuple[str, ...]] = ("mlp", "transformer")
    roundtrip_models: ClassVar[tuple[str, ...]] = ("mlp", "conv", "embedding")

    # ------------------------------------------------------------------ helpers

    @pytest.fixture(autouse=True)
    def _declared(self) -> None:
        if not self.scheme:
            pytest.fail(f"{type(self).__name__}: set scheme = '<registered scheme name>'")
        if self.sqnr_floor_db is None:
            pytest.fail(f"{type(self).__name__}: declare sqnr_floor_db (dB) for {self.scheme!r}")

    def _scheme(self, engine: Engine) -> Scheme:
        return engine.schemes.get(self.scheme)

    def _observer(self, engine: Engine) -> str:
        return self.observer or self._scheme(engine).default_observer

    def _config(self, engine: Engine, **extra: Any) -> Any:
        return engine.scheme_config(self.scheme, {**self.scheme_options, **extra})

    def _options(self, **extra: Any) -> dict[str, Any]:
        return {
            "scheme": self.scheme,
            "observer": self.observer,
            "scheme_options": {**self.scheme_options, **extra},
        }

    def _quantize(
        self, engine: Engine, w: torch.Tensor, config: Any = None, axis: int = 0
    ) -> QTensor | None:
        """``w`` quantized, or None when the scheme vetoes its shape (``Scheme.check``)."""
        cfg = config if config is not None else self._config(engine)
        if self._scheme(engine).check(tuple(w.shape), cfg):
            return None
        return engine.quantize_weight(
            w, self.scheme, self._observer(engine), axis=axis, scheme_config=cfg
        )

    @staticmethod
    def _linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
        return {
            f"{n}.weight": m.weight.detach()
            for n, m in model.named_modules()
            if isinstance(m, nn.Linear)
        }

    @staticmethod
    def _weight(rows: int = 48, cols: int = 96, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return (torch.rand(rows, cols, generator=g) * 2 - 1) / math.sqrt(cols)

    # ------------------------------------------------------------------ tests

    def test_registered_with_valid_metadata(self, contract_engine):
        reg = contract_engine.schemes.entry(self.scheme)
        sch = reg.component
        assert isinstance(sch, Scheme), f"{self.scheme!r} is a {type(sch)}, not a Scheme"
        assert sch.name == self.scheme
        assert isinstance(sch.capabilities, Capabilities), "capabilities must be Capabilities"
        check_config_class(sch.config_class, f"scheme {self.scheme!r}")
        assert sch.default_observer in contract_engine.observers, (
            f"default_observer {sch.default_observer!r} is not registered"
        )
        cfg = self._config(contract_engine)
        json.dumps(config_to_dict(cfg))  # stored in every file: must be JSON
        assert isinstance(sch.activations(cfg), str), "activations() must return a str"

    def test_sqnr_floor_on_tiny_models(self, contract_engine):
        models = tiny_models()
        for name in self.floor_models:
            _, report = contract_engine.quantize(models[name].build(), **self._options())
            assert report.layers, f"nothing of the {name!r} model was quantized"
            worst = min(report.layers, key=lambda layer: layer.sqnr_db)
            assert worst.sqnr_db >= self.sqnr_floor_db, (
                f"{name}: SQNR {worst.sqnr_db:.2f} dB of {worst.name} < floor "
                f"{self.sqnr_floor_db:.2f} dB"
            )

    @pytest.mark.parametrize("shape", [(48, 96), (8, 100), (6, 8, 3, 3)])
    def test_qtensor_is_consistent(self, contract_engine, shape):
        sch = self._scheme(contract_engine)
        caps = sch.capabilities
        w = self._weight(shape[0], math.prod(shape[1:])).reshape(shape)
        qt = self._quantize(contract_engine, w)
        if qt is None:
            pytest.skip(f"{self.scheme!r} vetoes shape {shape}")
        qt.validate()
        assert qt.scheme == self.scheme and qt.shape == shape and qt.dtype == w.dtype
        if caps.bits:
            assert qt.bits in caps.bits, f"bits {qt.bits} not declared in {caps.bits}"
        if caps.group_sizes:
            assert qt.group_size in caps.group_sizes, (
                f"group_size {qt.group_size} not declared in {caps.group_sizes}"
            )
        if caps.symmetric:
            assert qt.symmetric in caps.symmetric
        deq = sch.dequantize(qt)
        assert tuple(deq.shape) == shape and deq.dtype == w.dtype
        assert bool(torch.isfinite(deq).all()), "dequantize produced NaN/Inf"
        json.dumps(qt.meta)  # recorded in the file header
        plugin = contract_engine.schemes.entry(self.scheme).plugin
        assert qt.meta.get("plugin") == plugin
        assert qt.meta.get("layout") in ("affine", "custom")
        if qt.meta["layout"] == "affine":
            assert torch.equal(deq, qt.dequantize()), "affine layout: dequantize must match"
        assert qt.bits_per_weight < 8 * w.element_size(), "the QTensor is not smaller"

    def test_declared_dtypes(self, contract_engine):
        sch = self._scheme(contract_engine)
        base = next(iter(self._linear_weights(mlp()).values()))
        for dtype in sch.capabilities.dtypes:
            w = base.to(dtype)
            qt = self._quantize(contract_engine, w)
            assert qt is not None, f"{self.scheme!r} vetoes a {dtype} weight"
            deq = sch.dequantize(qt)
            assert qt.dtype == dtype and deq.dtype == dtype, f"{dtype}: dtype not kept"
            assert_sqnr(w, deq, self.sqnr_floor_db, f"{dtype} weight")

    def test_deterministic(self):
        a, b = self.make_engine(), self.make_engine()
        for name, w in self._linear_weights(mlp()).items():
            qa, qb = self._quantize(a, w), self._quantize(b, w)
            if qa is None:
                continue
            assert_qtensor_equal(qa, qb, f"second quantization of {name}")
            assert torch.equal(self._scheme(a).dequantize(qa), self._scheme(b).dequantize(qb))

    def test_inputs_are_not_modified(self, contract_engine):
        w = self._weight()
        before = w.clone()
        self._quantize(contract_engine, w)
        assert torch.equal(w, before), "quantize modified the float weight"
        model = mlp()
        snap = state_snapshot(model)
        contract_engine.plan(model, **self._options())
        assert_unchanged(model, snap, "plan()")

    def test_round_trip_through_every_serializer(self, contract_engine, tmp_path):
        models = tiny_models()
        done = 0
        for name in self.roundtrip_models:
            tm = models[name]
            qmodel, report = contract_engine.quantize(tm.build(), only=tm.only, **self._options())
            if not report.layers:
                continue
            folder = Path(tmp_path) / name
            folder.mkdir()
            assert_roundtrip_exact(contract_engine, qmodel, tm.build, tm.inputs, folder)
            done += 1
        assert done, f"no model of {self.roundtrip_models} had a layer {self.scheme!r} accepts"

    def test_declared_group_sizes_work(self, contract_engine):
        sch = self._scheme(contract_engine)
        declared = [g for g in sch.capabilities.group_sizes if g is not None]
        if self.group_size_option not in _fields(sch.config_class):
            assert not declared, (
                f"{self.scheme!r} declares group sizes {declared} but its config has no "
                f"{self.group_size_option!r} option (set group_size_option on the contract)"
            )
            pytest.skip(f"{self.scheme!r} has no group-size option")
        for g in declared or [32, 64]:
            cfg = self._config(contract_engine, **{self.group_size_option: g})
            w = self._weight(16, 2 * g)
            qt = self._quantize(contract_engine, w, cfg)
            assert qt is not None and qt.group_size == g, f"group_size={g} was not applied"
            qt.validate()
            db = sqnr_db(w, sch.dequantize(qt))
            assert db > 0, f"group_size={g}: SQNR {db:.2f} dB"
            model = nn.Sequential(nn.Linear(2 * g, 16))
            plan = contract_engine.plan(model, **self._options(**{self.group_size_option: g}))
            assert plan.selected, f"group_size={g}: a [16, {2 * g}] weight is not planned"

    def test_undeclared_group_sizes_fail_before_any_compute(self, contract_engine):
        sch = self._scheme(contract_engine)
        opt = self.group_size_option
        if opt not in _fields(sch.config_class):
            with pytest.raises(MonoQuantError):
                contract_engine.configure(**self._options(**{opt: 64}))
            return
        declared = sch.capabilities.group_sizes
        if not declared:
            pytest.skip(f"{self.scheme!r} declares no group-size restriction")
        spy = QuantizeSpy()
        engine = self.make_engine(spy)
        for g in (g for g in self.undeclared_group_sizes if g not in declared):
            model = mlp()
            snap = state_snapshot(model)
            with pytest.raises(CapabilityError):
                engine.quantize(model, **self._options(**{opt: g}))
            rule = ("0", {"scheme": self.scheme, "scheme_options": {**self.scheme_options, opt: g}})
            with pytest.raises(CapabilityError):
                engine.plan(model, scheme=self.scheme, rules=[rule])
            assert spy.calls == 0, f"group_size={g}: a module was quantized before the error"
            assert_unchanged(model, snap, f"group_size={g}")

    def test_failure_leaves_the_input_model_untouched(self, contract_engine):
        model = mlp()
        selected = [e.name for e in contract_engine.plan(model, **self._options()).selected]
        assert selected, f"{self.scheme!r} selects nothing in the tiny MLP"
        with torch.no_grad():  # a NaN in the last planned layer: found after the others ran
            model.get_submodule(selected[-1]).weight[0, 0] = float("nan")
        snap = state_snapshot(model)
        with pytest.raises(MonoQuantError, match="NaN"):
            contract_engine.quantize(model, **self._options())
        assert_unchanged(model, snap, "after a NaN weight")
        model = mlp()
        snap = state_snapshot(model)
        engine = self.make_engine(QuantizeSpy(fail_on=selected[-1]))
        with pytest.raises(MonoQuantError, match="contract-spy fails the run"):
            engine.quantize(model, **self._options())
        assert_unchanged(model, snap, "after a plugin failed")

    def test_file_names_its_producer_when_the_plugin_is_missing(self, contract_engine, tmp_path):
        reg = contract_engine.schemes.entry(self.scheme)
        qmodel, _ = contract_engine.quantize(mlp(), **self._options())
        qts = [(f"{n}.{p}", qt) for n, m in qmodel.named_modules()
               if isinstance(m, QuantizedModule) for p, qt in m.qtensors().items()]  # fmt: skip
        ser = next(  # the first format that stores these tensors (an export format may not)
            name
            for name in contract_engine.serializers.names()
            if not any(contract_engine.serializers.get(name).unsupported(n, q) for n, q in qts)
        )
        suffix = (contract_engine.serializers.get(ser).suffixes or ("",))[0]
        path = str(Path(tmp_path) / f"model{suffix}")
        contract_engine.save(qmodel, path, serializer=ser)
        layouts = {
            qt.meta.get("layout")
            for m in qmodel.modules()
            if isinstance(m, QuantizedModule)
            for qt in m.qtensors().values()
        }
        without = self.engine_without_plugin(contract_engine, reg.plugin)
        if self.scheme in without.schemes or ser not in without.serializers:
            pytest.skip(f"plugin {reg.plugin!r} cannot be left out here")
        with pytest.raises(FormatError) as e:
            without.load(path, mlp())
        msg = str(e.value)
        assert f"scheme {self.scheme!r}" in msg and f"plugin {reg.plugin!r}" in msg, msg
        if reg.distribution:
            assert f"pip install {reg.distribution}" in msg, msg
        if layouts == {"affine"}:
            state = without.load(path, dequantize=True)
            want = contract_engine.load(path, dequantize=True)
            assert state.keys() == want.keys()
            assert all(torch.equal(state[k], want[k]) for k in want), "dequantize differs"
        else:
            with pytest.raises(FormatError, match="not installed"):
                without.load(path, dequantize=True)

    def test_checkpoint_mode(self, contract_engine, tmp_path):
        if "safetensors" not in contract_engine.serializers:
            pytest.skip("checkpoint mode writes safetensors, which is not installed")
        model = mlp()
        src, dst = Path(tmp_path) / "float.pt", Path(tmp_path) / "quant.safetensors"
        torch.save(model.state_dict(), src)
        report = contract_engine.quantize_checkpoint(
            str(src), str(dst), progress=False, **self._options()
        )
        assert report.layers, "checkpoint mode quantized nothing"
        assert min(layer.sqnr_db for layer in report.layers) >= self.sqnr_floor_db
        state = contract_engine.load(str(dst), dequantize=True)
        assert state.keys() == model.state_dict().keys()
        loaded = contract_engine.load(str(dst), mlp())
        with torch.no_grad():
            out = loaded(torch.randn(2, 32))
        assert bool(torch.isfinite(out).all())


def _fields(cls: type) -> set[str]:
    return {f.name for f in dataclasses.fields(cls)}
