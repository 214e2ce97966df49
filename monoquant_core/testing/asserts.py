"""Assertions for quantization tests, with messages that print the measured values.

Plain functions (no pytest needed): the pytest plugin (:mod:`monoquant_core.testing.plugin`)
offers them as the fixtures ``assert_sqnr`` and ``assert_roundtrip_exact``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from ..metrics import sqnr_db
from ..qtensor import QTensor
from ..quantized_module import QuantizedModule

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Engine

__all__ = ["assert_qtensor_equal", "assert_roundtrip_exact", "assert_sqnr", "run_model"]


def assert_sqnr(ref: Any, approx: Any, floor_db: float, what: str = "tensor") -> float:
    """Assert ``sqnr_db(ref, approx) >= floor_db``; returns the measured SQNR in dB.

    Shapes must match; ``approx`` is compared in float64 whatever its dtype.
    """
    ref, approx = torch.as_tensor(ref), torch.as_tensor(approx)
    if tuple(ref.shape) != tuple(approx.shape):
        raise AssertionError(f"{what}: shape {tuple(approx.shape)} != {tuple(ref.shape)}")
    db = sqnr_db(ref.detach().double(), approx.detach().double())
    if not db >= floor_db:
        raise AssertionError(f"{what}: SQNR {db:.2f} dB < floor {floor_db:.2f} dB")
    return db


def assert_qtensor_equal(a: QTensor, b: QTensor, what: str = "qtensor") -> None:
    """Assert two QTensors are identical: every stored tensor (values and dtype), the layout
    fields and the metadata."""
    for field in ("bits", "group_size", "axis", "shape", "dtype", "scheme", "symmetric"):
        va, vb = getattr(a, field), getattr(b, field)
        if va != vb:
            raise AssertionError(f"{what}: {field} {vb!r} != {va!r}")
    ta, tb = a.tensors(), b.tensors()
    if set(ta) != set(tb):
        raise AssertionError(f"{what}: stored roles {sorted(tb)} != {sorted(ta)}")
    for role, t in ta.items():
        u = tb[role]
        if t.dtype != u.dtype or tuple(t.shape) != tuple(u.shape):
            raise AssertionError(
                f"{what}.{role}: {u.dtype} {tuple(u.shape)} != {t.dtype} {tuple(t.shape)}"
            )
        if not torch.equal(t.cpu(), u.cpu()):
            raise AssertionError(f"{what}.{role}: values differ")
    if dict(a.meta) != dict(b.meta):
        raise AssertionError(f"{what}: meta {b.meta!r} != {a.meta!r}")


def run_model(model: nn.Module, inputs: Any) -> Any:
    """``model(*inputs)`` for a tuple/list, else ``model(inputs)``, without autograd."""
    with torch.no_grad():
        if isinstance(inputs, (tuple, list)):
            return model(*inputs)
        return model(inputs)


def _assert_same_output(a: Any, b: Any, what: str) -> None:
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            raise AssertionError(f"{what}: output type/dtype/shape changed")
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item()
            raise AssertionError(f"{what}: outputs are not bit-identical (max |diff| {diff:.3g})")
    elif isinstance(a, (tuple, list)):
        if len(a) != len(b):
            raise AssertionError(f"{what}: {len(b)} outputs != {len(a)}")
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_same_output(x, y, f"{what}[{i}]")
    elif isinstance(a, dict):
        if a.keys() != b.keys():
            raise AssertionError(f"{what}: output keys differ")
        for k in a:
            _assert_same_output(a[k], b[k], f"{what}[{k!r}]")
    elif a != b:
        raise AssertionError(f"{what}: {b!r} != {a!r}")


def _qtensors(model: nn.Module) -> dict[str, QTensor]:
    out = {}
    for mname, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            for p, qt in m.qtensors().items():
                out[f"{mname}.{p}" if mname else p] = qt
    return out


def assert_roundtrip_exact(
    engine: Engine,
    qmodel: nn.Module,
    build: Callable[[], nn.Module],
    inputs: Any,
    directory: str | os.PathLike[str],
    serializers: Iterable[str] | None = None,
) -> dict[str, nn.Module]:
    """Save ``qmodel`` with every serializer and load it back: nothing may change.

    For each serializer (default: every one registered in ``engine``) that can store every
    quantized tensor of the model (:meth:`~monoquant_core.Serializer.unsupported`; at least one
    must) the model is saved to
    ``directory``, loaded into ``build()`` (on the same backends) and checked: every QTensor
    identical (codes, scales, zero points, extras, dtypes, metadata), every other tensor
    identical, outputs on ``inputs`` bit-identical; and ``load(..., dequantize=True)`` gives
    exactly the scheme's ``dequantize`` of each stored weight, under the float model's
    ``state_dict`` names.

    Returns:
        The loaded models by serializer name.
    """
    names = list(serializers) if serializers is not None else engine.serializers.names()
    if not names:
        raise AssertionError("no serializer is registered")
    expected_out = run_model(qmodel, inputs)
    expected_q = _qtensors(qmodel)
    if not expected_q:
        raise AssertionError("the model has no quantized modules to round-trip")
    plain = {k: v for k, v in qmodel.state_dict().items() if not _is_qbuffer(qmodel, k)}
    backends = _backends(qmodel)
    # one backend everywhere (maybe forced when quantizing): load onto it; mixed backends were
    # chosen per layer by capability, and loading chooses the same way
    forced = next(iter(set(backends.values()))) if len(set(backends.values())) == 1 else None
    float_keys = set(build().state_dict())
    loaded_models = {}
    for name in names:
        ser = engine.serializers.get(name)
        if any(ser.unsupported(k, qt) for k, qt in expected_q.items()):
            continue  # a format for a subset of schemes (its own tests cover that subset)
        suffix = ser.suffixes[0] if ser.suffixes else ""
        path = str(Path(directory) / f"roundtrip-{name}{suffix}")
        engine.save(qmodel, path, serializer=name)
        loaded = engine.load(path, build(), backend=forced)
        got_be = _backends(loaded)
        if got_be != backends:
            raise AssertionError(f"{name}: backends after loading {got_be} != {backends}")
        got_q = _qtensors(loaded)
        if set(got_q) != set(expected_q):
            raise AssertionError(
                f"{name}: quantized tensors {sorted(got_q)} != {sorted(expected_q)}"
            )
        for k, qt in expected_q.items():
            assert_qtensor_equal(qt, got_q[k], f"{name}: {k}")
        got_plain = {k: v for k, v in loaded.state_dict().items() if not _is_qbuffer(loaded, k)}
        if set(got_plain) != set(plain):
            raise AssertionError(f"{name}: float tensors {sorted(got_plain)} != {sorted(plain)}")
        for k, t in plain.items():
            if t.dtype != got_plain[k].dtype or not torch.equal(t, got_plain[k]):
                raise AssertionError(f"{name}: float tensor {k!r} changed")
        _assert_same_output(expected_out, run_model(loaded, inputs), f"{name}: output")
        state = engine.load(path, dequantize=True)
        if set(state) != float_keys:
            raise AssertionError(
                f"{name}: dequantized state_dict keys differ from the float model's: "
                f"missing {sorted(float_keys - set(state))[:5]}, "
                f"unexpected {sorted(set(state) - float_keys)[:5]}"
            )
        for k, qt in expected_q.items():
            want = engine.schemes.get(qt.scheme).dequantize(qt)
            if not torch.equal(state[k], want):
                raise AssertionError(f"{name}: dequantize=True changed {k!r}")
        loaded_models[name] = loaded
    if not loaded_models:
        raise AssertionError(f"no serializer of {names} can store the model's quantized tensors")
    return loaded_models


def _backends(model: nn.Module) -> dict[str, str]:
    return {n: m.backend.name for n, m in model.named_modules() if isinstance(m, QuantizedModule)}


def _is_qbuffer(model: nn.Module, key: str) -> bool:
    mname, _, buf = key.rpartition(".")
    try:
        m = model.get_submodule(mname)
    except AttributeError:
        return False
    return isinstance(m, QuantizedModule) and buf in m.qbuffer_names()
