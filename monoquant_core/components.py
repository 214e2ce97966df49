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
from .errors import UsageError
from .options import ComponentConfig
from .qtensor import QParams, QTensor, QuantSpec

__all__ = [
    "Artifact",
    "Backend",
    "Kernel",
    "Observer",
    "Replacer",
    "Scheme",
    "Serializer",
    "WeightInfo",
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

    def cost_per_element(self, config: Any) -> float:
        """Relative work of quantizing one weight element with ``config`` (1.0: a min/max pass
        and a rounding, like ``int8``). A distributed checkpoint run balances its ranks by
        elements x this (docs/scale.md); only the ratios between tensors matter. Default 1.0.
        """
        return 1.0

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


class Serializer(ABC):
    """Reads and writes :class:`Artifact` s. The core handles temp files and renames.

    Checkpoint mode streams through :meth:`open_reader` / :meth:`open_writer`; a serializer
    that overrides them keeps memory bounded by the largest tensor.
    """

    name: ClassVar[str] = ""
    suffixes: ClassVar[tuple[str, ...]] = ()
    #: a format that holds a model graph (ONNX): written by :meth:`export_model` from the
    #: model, an example input and the quantized tensors (``monoquant export --model``)
    needs_model: ClassVar[bool] = False
    #: what a user can do about a tensor :meth:`unsupported` refuses (the fix of the one-line
    #: error checkpoint mode raises at the first such tensor, before the rest is quantized)
    unsupported_fix: ClassVar[str] = (
        "quantize with a scheme and options this format can hold, or keep the default "
        "safetensors format"
    )

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

    def export_model(
        self, model: nn.Module, example: tuple[Any, ...], artifact: Artifact, path: str
    ) -> dict[str, Any]:
        """Formats with ``needs_model``: write ``model`` (a float model holding the file's
        dequantized weights) traced on ``example``, with the QTensors of ``artifact`` in the
        format's own quantized representation; returns facts for the report (counts)."""
        raise UsageError(
            f"the {self.name} format stores tensors, not a model graph",
            "drop the model and example input, or choose a graph format such as onnx",
        )

    def unsupported(self, name: str, qt: QTensor) -> str | None:
        """Why this format cannot store ``qt`` under ``name`` (None: it can). Writers refuse
        such a tensor with this reason; the test kit's round trips skip the format for such a
        model. Default: everything is stored."""
        return None

    def hf_quantization_config(self, qtensors: dict[str, dict[str, Any]]) -> dict[str, Any] | None:
        """The ``quantization_config`` entry for the output's Hugging Face ``config.json`` when
        the input folder is a transformers model, from the facts
        (:meth:`~monoquant_core.QTensor.facts`) of every quantized tensor written, by name.
        Default None: ``config.json`` is copied unchanged."""
        return None
