"""Mono Quant: model-agnostic, plugin-based post-training quantization for PyTorch.

Four verbs cover most use::

    from monoquant_core import quantize, save, load

    qmodel = quantize(model, bits=8)                 # or Engine().quantize(...) for a report
    save(qmodel, "model.safetensors")
    qmodel2 = load("model.safetensors", build_model())        # bit-identical outputs
    state = load("model.safetensors", dequantize=True)        # plain float state_dict

Plugin authors import :data:`hookimpl`, the component base classes and :class:`Run` from here.
This module only re-exports; each name lives in the module that owns it (see
docs/architecture.md).
"""

from __future__ import annotations

from . import _quiet  # noqa: F401  (first: torch's NumPy warning is filtered before torch loads)
from .affine import minmax_qparams
from .api import load, quantize, save
from .artifacts import ArtifactReader, ArtifactWriter, TensorSource, write_through
from .calibration import CalibrationWarning
from .capabilities import Capabilities
from .components import (
    Artifact,
    Backend,
    Kernel,
    Observer,
    Replacer,
    Scheme,
    Serializer,
    WeightInfo,
)
from .config import Config
from .engine import Engine
from .errors import (
    CapabilityError,
    FormatError,
    MonoQuantError,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    PluginLoadWarning,
    UsageError,
    WeightNotRepresentable,
)
from .markers import hookimpl
from .metrics import sqnr_db
from .options import ComponentConfig, PluginOptions
from .plan import ModuleResult, Plan, PlanEntry, QuantResult
from .qtensor import QParams, QTensor, QuantSpec
from .quantized_module import QuantizedModule
from .report import LayerReport, QuantReport
from .rules import Rule
from .run import Run
from .version import __version__

__all__ = [
    "Artifact",
    "ArtifactReader",
    "ArtifactWriter",
    "Backend",
    "CalibrationWarning",
    "Capabilities",
    "CapabilityError",
    "ComponentConfig",
    "Config",
    "Engine",
    "FormatError",
    "Kernel",
    "LayerReport",
    "ModuleResult",
    "MonoQuantError",
    "Observer",
    "Plan",
    "PlanEntry",
    "PluginConflictError",
    "PluginError",
    "PluginLoadError",
    "PluginLoadWarning",
    "PluginOptions",
    "QParams",
    "QTensor",
    "QuantReport",
    "QuantResult",
    "QuantSpec",
    "QuantizedModule",
    "Replacer",
    "Rule",
    "Run",
    "Scheme",
    "Serializer",
    "TensorSource",
    "UsageError",
    "WeightInfo",
    "WeightNotRepresentable",
    "__version__",
    "hookimpl",
    "load",
    "minmax_qparams",
    "quantize",
    "save",
    "sqnr_db",
    "write_through",
]
