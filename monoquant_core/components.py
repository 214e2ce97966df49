"""Component contracts: Observer, Scheme, Replacer, Serializer, Backend.

Plugins subclass these and hand instances (observers: classes, one instance per tensor) to the
``register`` callable of the matching ``monoquant_register_*`` hook. The core only ever talks to
components through these methods.
"""

from __future__ import annotations

import dataclasses
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .artifacts import Artifact, ArtifactReader, ArtifactWriter
from .capabilities import Capabilities
from .errors import CapabilityError, WeightNotRepresentable
from .options import ComponentConfig
from .qtensor import QParams, QTensor, QuantSpec

__all__ = [
    "Artifact",
    "Backend",
    "Kernel",
    "Observer",
    "QuantizedModule",
    "Replacer",
    "Scheme",
    "Serializer",
    "WeightInfo",
    "WeightNotRepresentable",
]


class Observer(ABC):
    """Collects statistics of a tensor and turns them into :class:`QParams`.

    One instance observes one tensor (a weight, or a layer's input during calibration).
    ``spec`` fixes the granularity: statistics are kept per ``[C, G]`` group.
    """

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = ComponentConfig
    capabilities: ClassVar[Capabilities] = Capabilities()

    def __init__(self, spec: QuantSpec, config: Any = None):
        self.spec = spec
        self.config = config if config is not None else self.config_class()

    @abstractmethod
    def update(self, x: torch.Tensor) -> None:
        """Accumulate statistics of ``x``."""

    @abstractmethod
    def qparams(self) -> QParams:
        """Return scale (and zero point) of shape ``[C, G]`` from what was observed."""


@dataclass(frozen=True)
class WeightInfo:
    """What a backend needs to decide whether it can run a weight (at plan or load time)."""

    scheme: str
    spec: QuantSpec
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: str = "cpu"
    #: how the layer's inputs are quantized at run time: "none" (weight-only), "dynamic"
    #: (int8 per token, on every call), "dynamic-tensor" (uint8, one scale per call) or
    #: "static" (uint8 with the calibrated per-tensor ``act_scale`` / ``act_zero_point``).
    activations: str = "none"

    @classmethod
    def of(cls, qt: QTensor, device: str = "cpu") -> WeightInfo:
        return cls(qt.scheme, qt.spec, qt.shape, qt.dtype, device, qt.activations)


class Scheme(ABC):
    """A quantization scheme: turns a float weight into a :class:`QTensor` and back."""

    name: ClassVar[str] = ""
    config_class: ClassVar[type] = ComponentConfig
    capabilities: ClassVar[Capabilities] = Capabilities()
    default_observer: ClassVar[str] = "minmax"

    @abstractmethod
    def spec(self, shape: tuple[int, ...], axis: int, config: Any) -> QuantSpec:
        """The :class:`QuantSpec` for a weight of ``shape`` whose channel axis is ``axis``."""

    def activations(self, config: Any) -> str:
        """How the layer's inputs are quantized at run time with ``config``: ``"none"``
        (weight-only, the default), ``"dynamic"`` (int8 per token on every call),
        ``"dynamic-tensor"`` or ``"static"`` (one scale / zero point from calibration, stored
        with the weight). The scheme records it in ``QTensor.meta["activations"]``; backends
        honour it (and refuse modes they cannot run in ``supports``)."""
        return "none"

    def needs_calibration(self, config: Any) -> bool:
        """True when ``config`` needs calibration data (default: ``activations == "static"``).

        A run with such an entry and no calibration data fails before any compute; an entry
        that saw no data during calibration falls back to :meth:`weight_only`.
        """
        return self.activations(config) == "static"

    def weight_only(self, config: Any) -> Any | None:
        """The weight-only variant of ``config`` (used when a layer saw no calibration data).

        Default: ``config`` with ``activations="none"`` when its dataclass has that field, else
        None (no weight-only variant: the layer is kept in float, with the reason).
        """
        if dataclasses.is_dataclass(config) and hasattr(config, "activations"):
            return dataclasses.replace(config, activations="none")
        return None

    def validate_config(self, config: Any) -> None:
        """Reject impossible option combinations at configure time (raise CapabilityError)."""
        return None

    def check(self, shape: tuple[int, ...], config: Any) -> str | None:
        """Plan-time veto: a human-readable reason this weight cannot use the scheme, or None.

        ``shape`` is the weight's shape with its channel axis first, ``[out, in, ...]``, as
        the replacer sees it (a GPT-2 ``Conv1D`` stores ``[in, out]``: its check gets
        ``[out, in]``), so ``shape[1:]`` are always the inputs of one channel.
        """
        return None

    def notes(self, shape: tuple[int, ...], config: Any) -> list[str]:
        """Plan-time remarks on a weight the scheme accepted (shown with the plan entry;
        start one with ``"warning: "`` when the user should act). ``shape`` as in
        :meth:`check`. Default: none."""
        return []

    @abstractmethod
    def quantize(
        self, weight: torch.Tensor, qparams: QParams, spec: QuantSpec, config: Any
    ) -> QTensor:
        """Quantize ``weight`` with the observer's ``qparams``."""

    def dequantize(self, qt: QTensor) -> torch.Tensor:
        """Float weight back from ``qt`` (default: the canonical affine layout)."""
        return qt.dequantize()


@dataclass(frozen=True)
class Kernel:
    """One kernel a backend runs for a weight, and the input rows (``M``) it serves.

    A layer's input is viewed as ``[M, K]`` (every leading dimension flattened); a backend
    whose best kernel depends on ``M`` (a GEMV-class kernel for few rows, a GEMM for many)
    declares one ``Kernel`` per range in :meth:`Backend.kernels`, and picks among them at
    call time by ``M`` alone (a comparison, no allocation).
    """

    name: str
    min_rows: int = 1
    max_rows: int | None = None  # inclusive; None = no upper bound

    def describe(self) -> str:
        """``"M 1-31: int8pack GEMV"``, ``"M >= 32: ..."`` or ``"any M: ..."``."""
        if self.max_rows is None:
            span = "any M" if self.min_rows <= 1 else f"M >= {self.min_rows}"
        elif self.min_rows == self.max_rows:
            span = f"M = {self.min_rows}"
        else:
            span = f"M {self.min_rows}-{self.max_rows}"
        return f"{span}: {self.name}"


class Backend(ABC):
    """Runs quantized layers on some hardware. ``reference`` is the ground truth."""

    name: ClassVar[str] = ""
    device_types: ClassVar[tuple[str, ...]] = ("cpu",)
    priority: ClassVar[int] = 0
    capabilities: ClassVar[Capabilities] = Capabilities()

    def available(self) -> bool | str:
        """True, or a string saying what is missing. Must be cheap and never raise."""
        return True

    def supports(self, info: WeightInfo) -> str | None:
        """None if this backend can run ``info``, else the reason it cannot."""
        return None

    def kernels(self, info: WeightInfo) -> tuple[Kernel, ...]:
        """Which kernel runs a supported weight, per range of input rows ``M`` (shown by
        ``monoquant plan``, the report and ``monoquant env``). Ranges are in order, start at
        ``M = 1`` and leave no gap. Default: one kernel named after the backend."""
        return (Kernel(self.name),)

    def expected_speedup(self, info: WeightInfo, rows: int) -> float | None:
        """How much faster this backend is expected to run a weight like ``info`` with
        ``rows`` input rows than a float ``nn.Linear`` in the weight's dtype (``info.dtype``:
        float32 or bfloat16 inputs); below 1 means slower. From the backend's own
        measurements (say which in its docs); None when unknown. ``monoquant plan`` notes every
        layer expected to be slower than float at the rows of ``--expect-batch``."""
        return None

    def prepare(self, qt: QTensor, scheme: Scheme) -> Any:
        """Derive the kernel layout of ``qt`` (never stored on disk).

        Called when the quantized module is built or loaded, and again after it moves device
        or its buffers are loaded, so the first forward pays nothing. ``scheme`` is the
        registered scheme of ``qt`` (its ``dequantize`` is the ground truth).
        """
        return (qt, scheme)

    @abstractmethod
    def linear(self, x: torch.Tensor, prepared: Any, bias: torch.Tensor | None) -> torch.Tensor:
        """``y = x @ W^T + bias`` with the prepared weight; output dtype = ``x.dtype``."""

    def weight(self, qt: QTensor, scheme: Scheme, dtype: torch.dtype) -> torch.Tensor:
        """The float weight, for operations this backend has no kernel for (conv, embedding)."""
        return scheme.dequantize(qt).to(dtype)


class Replacer(ABC):
    """Swaps a supported module for its quantized counterpart (lookup by type, along the MRO)."""

    name: ClassVar[str] = ""
    #: classes handled, or fully qualified class names (``"transformers.pytorch_utils.Conv1D"``)
    #: so an optional library need not be imported to register a replacer for its layers.
    module_types: ClassVar[tuple[type | str, ...]] = ()
    #: quantize matching modules by default (False = only when selected with ``only``).
    default: ClassVar[bool] = True
    #: run-time input quantization modes the quantized module honours (see
    #: ``Scheme.activations``); other modes are refused at plan time with a reason.
    activations: ClassVar[tuple[str, ...]] = ("none",)
    capabilities: ClassVar[Capabilities] = Capabilities()

    def weights(self, module: nn.Module) -> dict[str, torch.Tensor]:
        """The parameters to quantize, by attribute name (default ``{"weight": module.weight}``)."""
        return {"weight": module.weight}

    def channel_axis(self, module: nn.Module, param: str) -> int:
        """The output-channel axis of ``param`` (0 for ``nn.Linear.weight``)."""
        return 0

    def skip_reason(self, name: str, module: nn.Module, model: nn.Module) -> str | None:
        """Plan-time veto with a reason (e.g. a parent that reads the weight directly)."""
        return None

    @abstractmethod
    def replace(
        self, module: nn.Module, qweights: dict[str, QTensor], backend: Backend, scheme: Scheme
    ) -> nn.Module:
        """A new quantized module equivalent to ``module`` with ``qweights``.

        Must not modify ``module``. The new module keeps the original's forward contract
        (shapes, bias, output dtype = input dtype) and runs on ``backend``.
        """


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


class Serializer(ABC):
    """Reads and writes :class:`Artifact` s. The core handles temp files and renames.

    Checkpoint mode streams through :meth:`open_reader` / :meth:`open_writer`; a serializer
    that overrides them keeps memory bounded by the largest tensor.
    """

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()

    @abstractmethod
    def sniff(self, path: str) -> bool:
        """True if ``path`` looks like this serializer's format (cheap: header only)."""

    @abstractmethod
    def write(self, artifact: Artifact, path: str) -> None:
        """Write ``artifact`` to ``path`` (a temporary path the core renames on success)."""

    @abstractmethod
    def read(self, path: str) -> Artifact:
        """Read ``path``; raise :class:`~monoquant_core.errors.FormatError` on any bad input."""

    def open_reader(self, path: str) -> ArtifactReader:
        """A lazy reader of ``path`` (default: :meth:`read` everything; override to stream)."""
        return ArtifactReader(self, path)

    def open_writer(self, path: str) -> ArtifactWriter:
        """A writer taking one tensor at a time (default: buffer, then :meth:`write`)."""
        return ArtifactWriter(self, path)
