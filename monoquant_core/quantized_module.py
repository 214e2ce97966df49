"""The base class of quantized modules: QTensors as plain buffers, a backend, and the
backend's prepared (kernel) form kept in step with those buffers.

Replacers (:class:`~monoquant_core.components.Replacer`) build subclasses of it; the core
calls :meth:`QuantizedModule.prepare` after building or loading one.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .components import Backend, Scheme, WeightInfo
from .errors import CapabilityError
from .qtensor import QTensor

__all__ = ["QuantizedModule"]


class QuantizedModule(nn.Module):
    """Base of the modules replacers create: stores each QTensor as plain buffers.

    Buffers are named ``<param>_<role>`` (``weight_qdata``, ``weight_scale``, ...), so
    ``.to()``, ``state_dict()`` and ``load_state_dict()`` work as for any module. Dtype casts
    (``.to(torch.bfloat16)``, ``.half()``) never touch these buffers: their dtypes are part of
    the format. The backend's prepared (kernel) form is derived when the module is built
    (:meth:`prepare`, called by the core) and again whenever the module moves, loads new
    buffers or a buffer is replaced or written in place (:meth:`prepared`); it is never
    pickled or saved. After a move to another device type the module switches to the best of
    ``backend_candidates`` (set by the core, highest priority first) that supports the weight
    there.
    """

    def __init__(self, backend: Backend, scheme: Scheme) -> None:
        super().__init__()
        self._qmeta: dict[str, dict[str, Any]] = {}
        self.backend = backend
        self.scheme = scheme
        self._prepared: dict[str, Any] = {}
        self._stamps: dict[str, tuple[tuple[torch.Tensor, int], ...]] = {}
        self.backend_candidates: list[Backend] = [backend]

    def prepared(self, param: str = "weight") -> Any:
        """The backend's kernel form of ``param``: derived once, and again whenever one of
        its buffers was replaced (``module.weight_scale = t``) or written in place since
        (``state_dict()[k].copy_(...)``, ``module.weight_scale.mul_(2)``: torch counts every
        in-place write in the tensor's version; the check reads one version per buffer and
        call). Writes that torch does not count (through ``.data``, or into an inference
        tensor made under ``torch.inference_mode``) need a call to :meth:`prepare` after them.
        """
        p = self._prepared.get(param)
        if p is not None:
            for t, version in self._stamps.get(param, ()):
                if t._version != version:
                    break
            else:
                return p
        p = self._prepared[param] = self._derive(param)
        self._stamps[param] = tuple(
            (t, t._version)
            for n in self._buffer_names(param)
            if (t := self._buffers.get(n)) is not None and not t.is_inference()
        )
        return p

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if self.__dict__.get("_prepared") and name in self._buffers:
            self._prepared = {}  # a buffer replaced: derive the kernel form again

    def register_buffer(self, name: str, tensor: Any, persistent: bool = True) -> None:
        super().register_buffer(name, tensor, persistent)
        if self.__dict__.get("_prepared"):
            self._prepared = {}

    def _derive(self, param: str) -> Any:
        """The backend's kernel form of ``param`` from the current buffers (subclasses that
        hand the backend another view of the weight override this)."""
        return self.backend.prepare(self.qtensor(param), self.scheme)

    def _buffer_names(self, param: str) -> list[str]:
        return [f"{param}_{r}" for r in self._qmeta[param]["roles"]]

    def prepare(self) -> None:
        """Derive every quantized parameter's kernel form now (not at the first forward), from
        the buffers as they are (also after writes :meth:`prepared` cannot see)."""
        self._prepared = {}
        for param in self._qmeta:
            self.prepared(param)

    def _apply(self, fn: Any, recurse: bool = True) -> Any:
        self._prepared = {}
        qbuffers = {n: self._buffers[n] for n in self.qbuffer_names() if n in self._buffers}
        out = super()._apply(fn, recurse)
        for name, old in qbuffers.items():
            new = self._buffers.get(name)
            if new is not None and old is not None and new.dtype != old.dtype:
                self._buffers[name] = old.to(device=new.device)  # a move, never a cast
        self._reselect_backend()
        if self._qmeta:
            self.prepare()
        return out

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__() if hasattr(super(), "__getstate__") else self.__dict__
        # kernel layouts are machine-specific: never pickled
        return {**state, "_prepared": {}, "_stamps": {}}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__({"_prepared": {}, "_stamps": {}, **state})  # older pickles too

    def _reselect_backend(self) -> None:
        if not self._qmeta:
            return
        param = next(iter(self._qmeta))
        qt = self.qtensor(param)
        info = WeightInfo.of(qt, qt.qdata.device.type)
        if info.device in self.backend.device_types and self.backend.supports(info) is None:
            return
        for be in self.backend_candidates:
            if info.device in be.device_types and be.supports(info) is None:
                self.backend = be
                return
        raise CapabilityError(
            f"no backend of this module runs a {qt.scheme} weight on {info.device}",
            "move it back, or install a backend plugin for that device",
        )

    def _load_from_state_dict(self, state_dict: Any, prefix: str, *args: Any, **kwargs: Any):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if any(prefix + n in state_dict for n in self.qbuffer_names()):
            self.prepare()  # new codes or scales: derive the kernel form again

    def set_qtensor(self, param: str, qt: QTensor) -> None:
        roles = list(qt.tensors())
        for role, t in qt.tensors().items():
            self.register_buffer(f"{param}_{role}", t)
        self._qmeta[param] = {
            "roles": roles,
            "bits": qt.bits,
            "group_size": qt.group_size,
            "axis": qt.axis,
            "shape": qt.shape,
            "dtype": qt.dtype,
            "scheme": qt.scheme,
            "meta": qt.meta,
        }

    def set_bias(self, bias: torch.Tensor | None) -> None:
        """Keep a float copy of the original bias as the ``bias`` parameter (or None)."""
        if bias is None:
            self.register_parameter("bias", None)
        else:
            self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)

    def qtensor(self, param: str = "weight") -> QTensor:
        m = self._qmeta[param]
        t = {role: getattr(self, f"{param}_{role}") for role in m["roles"]}
        extra = {k: v for k, v in t.items() if k not in ("qdata", "scale", "zero_point")}
        return QTensor(
            qdata=t["qdata"],
            scale=t["scale"],
            zero_point=t.get("zero_point"),
            bits=m["bits"],
            group_size=m["group_size"],
            axis=m["axis"],
            shape=m["shape"],
            dtype=m["dtype"],
            scheme=m["scheme"],
            extra=extra,
            meta=m["meta"],
        )

    def qtensors(self) -> dict[str, QTensor]:
        return {p: self.qtensor(p) for p in self._qmeta}

    def qbuffer_names(self) -> list[str]:
        return [f"{p}_{r}" for p, m in self._qmeta.items() for r in m["roles"]]
