"""``ObserverContract``: the tests every observer must pass."""

from __future__ import annotations

import math
from typing import Any, ClassVar

import pytest
import torch

from ..affine import dequantize_groups, quantize_groups
from ..components import Observer
from ..errors import MonoQuantError
from ..layout import to_groups
from ..options import parse_options
from ..qtensor import QuantSpec
from .asserts import assert_sqnr
from .contract_base import Contract, check_config_class
from .models import tiny_models

__all__ = ["ObserverContract"]

#: the specs every observer is tried with (filtered by its declared granularities).
SPECS = {
    "per-tensor int8": QuantSpec(8, True, None),
    "per-channel int8": QuantSpec(8, True, 0),
    "per-channel uint8": QuantSpec(8, False, 0),
    "group-32 uint4 float zero": QuantSpec(4, False, 0, 32, True, torch.float16),
    "group-32 int4": QuantSpec(4, True, 0, 32),
}


def _granularity(spec: QuantSpec) -> str:
    return "group" if spec.group_size is not None else spec.granularity


class ObserverContract(Contract):
    """Contract suite for an observer.

    Subclass it in a test module and set ``observer`` and ``sqnr_floor_db``::

        class TestMyObserverContract(ObserverContract):
            observer = "my-observer"
            sqnr_floor_db = 38.0

    Attributes:
        observer: the registered name of the observer under test.
        sqnr_floor_db: the SQNR (dB) that per-channel symmetric int8 with this observer's
            parameters reaches on every weight of the tiny MLP and transformer block.
        observer_options: options for every test.
        scheme: the scheme used for the end-to-end test (default ``int8``, per-channel).
    """

    observer: ClassVar[str] = ""
    sqnr_floor_db: ClassVar[float | None] = None
    observer_options: ClassVar[dict[str, Any]] = {}
    scheme: ClassVar[str] = "int8"

    @pytest.fixture(autouse=True)
    def _declared(self) -> None:
        if not self.observer:
            pytest.fail(f"{type(self).__name__}: set observer = '<registered observer name>'")
        if self.sqnr_floor_db is None:
            pytest.fail(f"{type(self).__name__}: declare sqnr_floor_db for {self.observer!r}")

    def _make(self, engine: Any, spec: QuantSpec) -> Observer:
        cls = engine.observers.get(self.observer)
        config = parse_options(cls.config_class, self.observer_options, f"observer {cls.name!r}")
        return cls(spec, config)

    def _specs(self, engine: Any) -> dict[str, QuantSpec]:
        declared = engine.observers.get(self.observer).capabilities.granularities
        return {k: s for k, s in SPECS.items() if not declared or _granularity(s) in declared}

    @staticmethod
    def _data(rows: int = 24, cols: int = 100, seed: int = 0) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(rows, cols, generator=g) / math.sqrt(cols)

    def _check_params(self, qp: Any, spec: QuantSpec, x: torch.Tensor, what: str) -> None:
        c, ng, _ = to_groups(x, spec.axis, spec.group_size).shape
        assert tuple(qp.scale.shape) == (c, ng), (
            f"{what}: scale shape {tuple(qp.scale.shape)} != [C, G] = {(c, ng)}"
        )
        assert qp.scale.is_floating_point() and bool(torch.isfinite(qp.scale).all())
        assert bool((qp.scale > 0).all()), f"{what}: scales must be positive"
        if spec.symmetric:
            assert qp.zero_point is None, f"{what}: symmetric spec but a zero point"
            return
        assert qp.zero_point is not None, f"{what}: asymmetric spec needs a zero point"
        assert tuple(qp.zero_point.shape) == (c, ng)
        assert bool(torch.isfinite(qp.zero_point).all())
        if not spec.float_zero:
            z = qp.zero_point
            assert torch.equal(z, z.round()), f"{what}: integer zero point expected"
            assert bool(((z >= spec.qmin) & (z <= spec.qmax)).all()), f"{what}: zero out of range"

    # ------------------------------------------------------------------ tests

    def test_registered_as_a_class(self, contract_engine):
        cls = contract_engine.observers.get(self.observer)
        assert isinstance(cls, type) and issubclass(cls, Observer), (
            f"observers are registered as Observer subclasses (a fresh instance per tensor), "
            f"got {cls!r}"
        )
        assert cls.name == self.observer
        check_config_class(cls.config_class, f"observer {self.observer!r}")

    def test_qparams_have_the_spec_shape(self, contract_engine):
        specs = self._specs(contract_engine)
        assert specs, f"{self.observer!r} declares none of the granularities {list(SPECS)}"
        x = self._data()
        for what, spec in specs.items():
            obs = self._make(contract_engine, spec)
            obs.update(x)
            self._check_params(obs.qparams(), spec, x, what)

    def test_sqnr_floor_per_channel_int8(self, contract_engine):
        spec = SPECS["per-channel int8"]
        if "per-channel int8" not in self._specs(contract_engine):
            pytest.skip(f"{self.observer!r} does not declare per-channel")
        models = tiny_models()
        for name in ("mlp", "transformer"):
            for pname, w in models[name].build().named_parameters():
                if w.dim() != 2:
                    continue
                obs = self._make(contract_engine, spec)
                obs.update(w.detach())
                qp = obs.qparams()
                g = to_groups(w.detach(), 0, None)
                deq = dequantize_groups(quantize_groups(g, qp, spec), qp)
                assert_sqnr(g, deq, self.sqnr_floor_db, f"{name}.{pname}")
        _, report = contract_engine.quantize(
            models["mlp"].build(),
            scheme=self.scheme,
            observer=self.observer,
            observer_options=self.observer_options,
        )
        worst = min(r.sqnr_db for r in report.layers)
        assert worst >= self.sqnr_floor_db, f"{self.scheme} on the MLP: {worst:.2f} dB"

    def test_deterministic_and_inputs_unmodified(self, contract_engine):
        x = self._data()
        before = x.clone()
        for what, spec in self._specs(contract_engine).items():
            a, b = self._make(contract_engine, spec), self._make(contract_engine, spec)
            a.update(x)
            b.update(x.clone())
            qa, qb = a.qparams(), b.qparams()
            assert torch.equal(qa.scale, qb.scale), f"{what}: scales differ between runs"
            if qa.zero_point is not None:
                assert torch.equal(qa.zero_point, qb.zero_point), f"{what}: zero points differ"
        assert torch.equal(x, before), "update() modified the observed tensor"

    def test_all_zero_tensor_is_exact(self, contract_engine):
        x = torch.zeros(4, 64)
        for what, spec in self._specs(contract_engine).items():
            obs = self._make(contract_engine, spec)
            obs.update(x)
            qp = obs.qparams()
            self._check_params(qp, spec, x, f"{what} of zeros")
            g = to_groups(x, spec.axis, spec.group_size)
            deq = dequantize_groups(quantize_groups(g, qp, spec), qp)
            assert torch.equal(deq, torch.zeros_like(deq)), f"{what}: zeros not reproduced"

    def test_several_updates(self, contract_engine):
        spec = next(iter(self._specs(contract_engine).values()))
        obs = self._make(contract_engine, spec)
        for seed in range(3):
            obs.update(self._data(seed=seed))
        self._check_params(obs.qparams(), spec, self._data(), "after three updates")

    def test_qparams_without_data_raise(self, contract_engine):
        spec = next(iter(self._specs(contract_engine).values()))
        with pytest.raises(MonoQuantError):
            self._make(contract_engine, spec).qparams()
