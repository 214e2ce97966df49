"""``BackendContract``: the tests every backend must pass."""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ..capabilities import Capabilities
from ..components import Backend, Scheme, WeightInfo
from ..engine import Engine
from ..qtensor import QTensor
from .asserts import assert_sqnr
from .contract_base import Contract
from .models import odd_inputs

__all__ = ["BackendContract"]


class BackendContract(Contract):
    """Contract suite for a backend; ``reference`` is the ground truth it is measured against.

    Subclass it and name the backend::

        class TestMyBackendContract(BackendContract):
            backend = "my-gpu"
            sqnr_floor_db = 35.0

    Tests that run kernels skip (with the backend's own reason) where ``available()`` is not
    True, e.g. a GPU backend on a machine without a GPU; the metadata tests run everywhere.

    Attributes:
        backend: the registered name of the backend under test.
        sqnr_floor_db: output SQNR (dB) against the reference backend on the same QTensor.
        cases: ``(scheme, options)`` weights to try; None = every registered scheme with its
            default options. Cases the backend does not support are left out (``supports``).
        shapes: ``(out_features, in_features)`` of the weights tried.
    """

    backend: ClassVar[str] = ""
    sqnr_floor_db: ClassVar[float] = 30.0
    cases: ClassVar[tuple[tuple[str, dict[str, Any]], ...] | None] = None
    shapes: ClassVar[tuple[tuple[int, int], ...]] = ((48, 256),)

    @pytest.fixture(autouse=True)
    def _declared(self) -> None:
        if not self.backend:
            pytest.fail(f"{type(self).__name__}: set backend = '<registered backend name>'")

    def _be(self, engine: Engine) -> Backend:
        return engine.backends.get(self.backend)

    def _device(self, engine: Engine) -> str:
        be = self._be(engine)
        ok = be.available()
        if ok is not True:
            pytest.skip(f"backend {self.backend!r} is not available here: {ok}")
        for dev in ("cpu", "cuda", "mps", "xpu"):
            if dev in be.device_types and (dev == "cpu" or _has_device(dev)):
                return dev
        pytest.skip(f"none of {be.device_types} is present on this machine")

    def _weights(self, engine: Engine) -> list[tuple[str, QTensor, Scheme]]:
        cases = self.cases
        if cases is None:
            cases = tuple((name, {}) for name in engine.schemes.names())
        out = []
        for scheme, opts in cases:
            sch = engine.schemes.get(scheme)
            cfg = engine.scheme_config(scheme, opts)
            for n, k in self.shapes:
                g = torch.Generator().manual_seed(n * k)
                w = torch.randn(n, k, generator=g) / k**0.5
                if sch.check((n, k), cfg):
                    continue
                qt = engine.quantize_weight(w, scheme, sch.default_observer, scheme_config=cfg)
                out.append((f"{scheme} {opts or ''} {n}x{k}".replace("  ", " "), qt, sch))
        return out

    def _supported(self, engine: Engine, device: str) -> list[tuple[str, QTensor, Scheme]]:
        be = self._be(engine)
        out = [
            (what, qt.to(device), sch)
            for what, qt, sch in self._weights(engine)
            if be.supports(WeightInfo.of(qt, device)) is None
        ]
        if not out:
            pytest.skip(f"backend {self.backend!r} supports none of the weights tried")
        return out

    @staticmethod
    def _reference(
        engine: Engine, x: torch.Tensor, qt: QTensor, sch: Scheme, bias: Any
    ) -> torch.Tensor:
        """The ground truth in float32 on the CPU: the ``reference`` backend, or (when it is
        not installed) the scheme's dequantized weight and ``F.linear``."""
        x, qt = x.to("cpu", torch.float32), qt.to("cpu")
        b = None if bias is None else bias.to("cpu", torch.float32)
        if "reference" in engine.backends:
            ref = engine.backends.get("reference")
            return ref.linear(x, ref.prepare(qt, sch), b)
        return F.linear(x, sch.dequantize(qt).to(torch.float32), b)

    # ------------------------------------------------------------------ tests

    def test_registered_with_valid_metadata(self, contract_engine):
        be = self._be(contract_engine)
        assert isinstance(be, Backend) and be.name == self.backend
        assert isinstance(be.device_types, tuple) and be.device_types, "declare device_types"
        assert all(isinstance(d, str) for d in be.device_types)
        assert isinstance(be.priority, int)
        assert isinstance(be.capabilities, Capabilities)

    def test_available_never_raises(self, contract_engine):
        ok = self._be(contract_engine).available()
        assert ok is True or (isinstance(ok, str) and ok), (
            f"available() must return True or a non-empty reason, got {ok!r}"
        )

    def test_supports_answers_none_or_a_reason(self, contract_engine):
        be = self._be(contract_engine)
        for what, qt, _ in self._weights(contract_engine):
            for dev in be.device_types:
                why = be.supports(WeightInfo.of(qt, dev))
                assert why is None or (isinstance(why, str) and why), f"{what} on {dev}: {why!r}"

    def test_linear_matches_reference(self, contract_engine):
        device = self._device(contract_engine)
        be = self._be(contract_engine)
        for what, qt, sch in self._supported(contract_engine, device):
            n, k = qt.shape
            prepared = be.prepare(qt, sch)
            g = torch.Generator().manual_seed(k)
            bias = torch.randn(n, generator=g) * 0.1
            for lead, b in itertools.product([(1,), (5,), (2, 3)], (None, bias)):
                x = torch.randn(*lead, k, generator=g)
                xd = x.to(device)
                y = be.linear(xd, prepared, None if b is None else b.to(device))
                assert y.shape == (*lead, n) and y.dtype == x.dtype, (
                    f"{what}: output {y.dtype} {tuple(y.shape)}"
                )
                ref = self._reference(contract_engine, x, qt, sch, b)
                assert_sqnr(
                    ref, y.cpu(), self.sqnr_floor_db, f"{what} x{lead} bias={b is not None}"
                )
                again = be.linear(xd, prepared, None if b is None else b.to(device))
                assert torch.equal(y, again), f"{what}: two calls differ"

    def test_bfloat16_input_keeps_its_dtype(self, contract_engine):
        device = self._device(contract_engine)
        be = self._be(contract_engine)
        if be.capabilities.dtypes and torch.bfloat16 not in be.capabilities.dtypes:
            pytest.skip("bfloat16 is not declared")
        for what, qt, sch in self._supported(contract_engine, device):
            x = torch.randn(3, qt.shape[1]).to(torch.bfloat16)
            y = be.linear(x.to(device), be.prepare(qt, sch), None)
            assert y.dtype == torch.bfloat16, f"{what}: {y.dtype}"
            ref = self._reference(contract_engine, x, qt, sch, None)
            assert_sqnr(ref, y.cpu().float(), min(self.sqnr_floor_db, 30.0), f"{what} bf16")

    def test_empty_batch(self, contract_engine):
        device = self._device(contract_engine)
        be = self._be(contract_engine)
        for what, qt, sch in self._supported(contract_engine, device):
            x = torch.zeros(0, qt.shape[1], device=device)
            y = be.linear(x, be.prepare(qt, sch), None)
            assert y.shape == (0, qt.shape[0]) and y.dtype == x.dtype, f"{what}: {y.shape}"

    def test_odd_inputs_match_reference(self, contract_engine):
        """Non-contiguous, misaligned, half-precision, 3-D, all-zero and empty inputs give the
        reference's result (or a fallback's) with the input's dtype, and never crash."""
        device = self._device(contract_engine)
        be = self._be(contract_engine)
        for what, qt, sch in self._supported(contract_engine, device):
            n, k = qt.shape
            prepared = be.prepare(qt, sch)
            for label, x in odd_inputs(k, device).items():
                if be.capabilities.dtypes and x.dtype not in be.capabilities.dtypes:
                    continue
                y = be.linear(x, prepared, None)
                assert y.shape == (*x.shape[:-1], n) and y.dtype == x.dtype, (
                    f"{what}, {label}: output {y.dtype} {tuple(y.shape)}"
                )
                if not x.numel():
                    continue
                ref = self._reference(contract_engine, x.float(), qt, sch, None)
                if not ref.any():
                    assert not y.float().cpu().any(), f"{what}, {label}: expected zeros"
                    continue
                floor = self.sqnr_floor_db
                if x.dtype != torch.float32:  # half-precision inputs: rounding, as for bf16
                    floor = min(floor, 30.0)
                assert_sqnr(ref, y.cpu().float(), floor, f"{what} {label}")

    def test_weight_matches_dequantize(self, contract_engine):
        device = self._device(contract_engine)
        be = self._be(contract_engine)
        for what, qt, sch in self._weights(contract_engine):
            w = be.weight(qt.to(device), sch, torch.float32)
            assert w.dtype == torch.float32 and tuple(w.shape) == qt.shape, what
            assert_sqnr(sch.dequantize(qt).float(), w.cpu(), self.sqnr_floor_db, what)

    def test_engine_runs_models_on_it(self, contract_engine):
        device = self._device(contract_engine)
        what, qt, _ = self._supported(contract_engine, device)[0]
        scheme = qt.scheme
        opts = dict(next(o for s, o in (self.cases or ((scheme, {}),)) if s == scheme))
        n, k = qt.shape
        torch.manual_seed(0)
        float_model = nn.Sequential(nn.Linear(k, n)).to(device).eval()
        ref_model = nn.Sequential(nn.Linear(k, n)).to(device).eval()
        ref_model.load_state_dict(float_model.state_dict())
        model, _ = contract_engine.quantize(
            float_model, scheme=scheme, scheme_options=opts, backend=self.backend
        )
        ref, _ = contract_engine.quantize(
            ref_model, scheme=scheme, scheme_options=opts, backend="reference"
        )
        assert model[0].backend.name == self.backend
        x = torch.randn(4, k, device=device)
        with torch.no_grad():
            assert_sqnr(ref(x).cpu(), model(x).cpu(), self.sqnr_floor_db, f"{what} model")


def _has_device(dev: str) -> bool:
    mod = getattr(torch, dev, None)
    try:
        return bool(mod is not None and mod.is_available())
    except Exception:  # pragma: no cover - exotic builds
        return False
