"""``ReplacerContract``: the tests every module replacer must pass."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any, ClassVar

import pytest
import torch
from torch import nn

from ..components import Replacer
from ..engine import Engine
from ..quantized_module import QuantizedModule
from .asserts import assert_qtensor_equal, assert_roundtrip_exact, assert_sqnr, run_model
from .contract_base import Contract, assert_unchanged, state_snapshot

__all__ = ["ReplacerContract"]


class Holder(nn.Module):
    """Wraps the module under test as ``layer`` (plans and files name it ``layer``)."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, *args: Any) -> Any:
        return self.layer(*args)


class ReplacerContract(Contract):
    """Contract suite for a module replacer.

    Subclass it, name the replacer and say how to build one module it handles::

        class TestLinearContract(ReplacerContract):
            replacer = "linear"
            sqnr_floor_db = 30.0

            def build(self):
                return nn.Linear(64, 32)

            def example_input(self):
                return torch.randn(4, 64)

    The module is quantized with every registered scheme (default options; schemes that veto
    its shape are left out) on the ``reference`` backend. For each: the replacement is a
    :class:`~monoquant_core.QuantizedModule`, keeps the output shape and dtype (also for
    bfloat16 inputs), and computes exactly what the original computes with the scheme's
    dequantized weights; the original module is left untouched; saving and loading through
    every serializer changes nothing.

    Attributes:
        replacer: the registered name of the replacer under test.
        sqnr_floor_db: output SQNR (dB) against the float module with ``floor_scheme``.
        floor_scheme: the scheme the SQNR floor is declared for.
        rtol, atol: tolerance of "computes what the original computes with the dequantized
            weights" (float32; summation order may differ from the float module's).
    """

    replacer: ClassVar[str] = ""
    sqnr_floor_db: ClassVar[float | None] = None
    floor_scheme: ClassVar[str] = "int8"
    rtol: ClassVar[float] = 1e-5
    atol: ClassVar[float] = 1e-6

    def build(self) -> nn.Module:
        """A float module of a type the replacer handles (override; called after seeding)."""
        raise NotImplementedError(f"{type(self).__name__}: define build()")

    def example_input(self) -> Any:
        """An input for the module (override); a tuple is passed as several arguments."""
        raise NotImplementedError(f"{type(self).__name__}: define example_input()")

    # ------------------------------------------------------------------ helpers

    @pytest.fixture(autouse=True)
    def _declared(self) -> None:
        if not self.replacer:
            pytest.fail(f"{type(self).__name__}: set replacer = '<registered replacer name>'")
        if self.sqnr_floor_db is None:
            pytest.fail(f"{type(self).__name__}: declare sqnr_floor_db for {self.replacer!r}")

    def _holder(self) -> Holder:
        torch.manual_seed(0)
        return Holder(self.build()).eval()

    def _input(self) -> Any:
        torch.manual_seed(1)
        return self.example_input()

    def _quantize(self, engine: Engine, scheme: str, model: nn.Module | None = None):
        return engine.quantize(
            model if model is not None else self._holder(),
            scheme=scheme,
            only=["layer"],
            backend="reference",
        )

    def _schemes(self, engine: Engine) -> list[str]:
        """Registered schemes that select the module (not vetoed at plan time)."""
        out = []
        for name in engine.schemes.names():
            plan = engine.plan(self._holder(), scheme=name, only=["layer"], backend="reference")
            if plan.get("layer").selected:
                out.append(name)
        assert self.floor_scheme in out, f"{self.floor_scheme!r} does not select the module"
        return out

    # ------------------------------------------------------------------ tests

    def test_registered_for_its_module_type(self, contract_engine):
        reg = contract_engine.replacers.entry(self.replacer)
        rep = reg.component
        assert isinstance(rep, Replacer) and rep.name == self.replacer
        assert rep.module_types, "module_types must list the handled classes"
        found = contract_engine.replacers.for_type(type(self.build()))
        assert found is not None and found.name == self.replacer, (
            f"{type(self.build()).__name__} is handled by "
            f"{found.name if found else 'no replacer'}, not {self.replacer!r}"
        )
        weights = rep.weights(self.build())
        assert weights and all(isinstance(w, torch.Tensor) for w in weights.values())

    def test_plan_selects_the_module(self, contract_engine):
        rep = contract_engine.replacers.get(self.replacer)
        default = contract_engine.plan(self._holder()).get("layer")
        if rep.default:
            assert default.selected, f"default plan skips it: {default.skip_reason}"
        else:
            assert not default.selected and default.skip_reason, "opt-in layers need a reason"
        chosen = contract_engine.plan(self._holder(), only=["layer"]).get("layer")
        assert chosen.selected and chosen.replacer == self.replacer, chosen.skip_reason

    def test_output_contract_with_every_scheme(self, contract_engine):
        x = self._input()
        float_model = self._holder()
        ref = run_model(float_model, x)
        for scheme in self._schemes(contract_engine):
            qmodel, _ = self._quantize(contract_engine, scheme)
            layer = qmodel.layer
            assert isinstance(layer, QuantizedModule), f"{scheme}: got {type(layer).__name__}"
            out = run_model(qmodel, x)
            assert out.shape == ref.shape and out.dtype == ref.dtype, (
                f"{scheme}: output {out.dtype} {tuple(out.shape)} != {ref.dtype} {tuple(ref.shape)}"
            )
            twin = copy.deepcopy(float_model)
            with torch.no_grad():
                for p, qt in layer.qtensors().items():
                    deq = contract_engine.schemes.get(qt.scheme).dequantize(qt)
                    twin.layer.get_parameter(p).copy_(deq)
            torch.testing.assert_close(
                out,
                run_model(twin, x),
                rtol=self.rtol,
                atol=self.atol,
                msg=lambda m, s=scheme: (
                    f"{s}: not the float computation on the dequantized weights: {m}"
                ),
            )
            if scheme == self.floor_scheme:
                assert_sqnr(ref, out, self.sqnr_floor_db, f"{scheme} output")

    def test_low_precision_input_keeps_its_dtype(self, contract_engine):
        x = self._input()
        if not (isinstance(x, torch.Tensor) and x.is_floating_point()):
            pytest.skip("the module's input is not a float tensor")
        qmodel, _ = self._quantize(contract_engine, self.floor_scheme)
        out = run_model(qmodel, x.to(torch.bfloat16))
        assert out.dtype == torch.bfloat16, f"bfloat16 input gave a {out.dtype} output"

    def test_original_module_is_left_alone(self, contract_engine):
        holder = self._holder()
        original = holder.layer
        snap = state_snapshot(original)
        qmodel, _ = self._quantize(contract_engine, self.floor_scheme, holder)
        assert qmodel.layer is not original
        assert_unchanged(original, snap, "replace()")

    def test_round_trip_through_every_serializer(self, contract_engine, tmp_path):
        x = self._input()
        for scheme in self._schemes(contract_engine):
            qmodel, _ = self._quantize(contract_engine, scheme)
            folder = Path(tmp_path) / scheme
            folder.mkdir()
            assert_roundtrip_exact(contract_engine, qmodel, self._holder, x, folder)

    def test_deterministic(self):
        a, _ = self._quantize(self.make_engine(), self.floor_scheme)
        b, _ = self._quantize(self.make_engine(), self.floor_scheme)
        for p, qt in a.layer.qtensors().items():
            assert_qtensor_equal(qt, b.layer.qtensor(p), p)
        x = self._input()
        assert torch.equal(run_model(a, x), run_model(b, x))
