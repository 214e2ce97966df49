"""Mono Quant: model-agnostic, plugin-based post-training quantization for PyTorch.

Four verbs cover most use::

    from monoquant_core import quantize, save, load

    qmodel = quantize(model, bits=8)                 # or Engine().quantize(...) for a report
    save(qmodel, "model.safetensors")
    qmodel2 = load("model.safetensors", build_model())        # bit-identical outputs
    state = load("model.safetensors", dequantize=True)        # plain float state_dict

Plugin authors import only :data:`hookimpl` (and the component base classes).
"""

from __future__ import annotations

import functools
import importlib.metadata as _md
import warnings as _warnings
from collections.abc import Callable, Iterable
from typing import Any

import pluggy

#: The marker for hook implementations: ``@hookimpl def monoquant_register_schemes(register)``.
hookimpl = pluggy.HookimplMarker("monoquant")

try:
    __version__ = _md.version("monoquant")
except _md.PackageNotFoundError:  # pragma: no cover - running from a source tree
    __version__ = "0.0.0+unknown"

# torch warns on import when NumPy is absent; Mono Quant never needs NumPy, so hide that one line.
_warnings.filterwarnings("ignore", message="Failed to initialize NumPy", category=UserWarning)

from torch import nn  # noqa: E402

from .artifacts import ArtifactReader, ArtifactWriter, TensorSource  # noqa: E402
from .calibration import CalibrationWarning  # noqa: E402
from .capabilities import Capabilities  # noqa: E402
from .components import (  # noqa: E402
    Artifact,
    Backend,
    Observer,
    QuantizedModule,
    Replacer,
    Scheme,
    Serializer,
    WeightInfo,
    minmax_qparams,
)
from .config import ComponentConfig, Config  # noqa: E402
from .engine import Engine, ModuleResult, QuantResult  # noqa: E402
from .errors import (  # noqa: E402
    CapabilityError,
    FormatError,
    MonoQuantError,
    PluginConflictError,
    PluginError,
    PluginLoadError,
    PluginLoadWarning,
    UsageError,
)
from .plan import Plan, PlanEntry  # noqa: E402
from .qtensor import QParams, QTensor, QuantSpec, sqnr_db  # noqa: E402
from .report import LayerReport, QuantReport  # noqa: E402
from .rules import Rule  # noqa: E402

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
    "QParams",
    "QTensor",
    "QuantReport",
    "QuantResult",
    "QuantSpec",
    "QuantizedModule",
    "Replacer",
    "Rule",
    "Scheme",
    "Serializer",
    "TensorSource",
    "UsageError",
    "WeightInfo",
    "__version__",
    "hookimpl",
    "load",
    "minmax_qparams",
    "quantize",
    "save",
    "sqnr_db",
]

_SCHEME_FOR_BITS = {8: "int8", 4: "int4-group", 16: "fp16"}


def quantize(
    model: nn.Module | Callable[..., nn.Module] | None = None,
    *,
    bits: int | None = None,
    scheme: str | None = None,
    observer: str | None = None,
    backend: str | None = None,
    only: Iterable[str] | str = (),
    skip: Iterable[str] | str = (),
    scheme_options: dict[str, Any] | None = None,
    observer_options: dict[str, Any] | None = None,
    plugin_options: dict[str, dict[str, Any]] | None = None,
    rules: Iterable[Any] | None = None,
    calibration: Any = None,
    sequential: bool = False,
    engine: Engine | None = None,
) -> Any:
    """Quantize a model and return it; also usable as a decorator of a model factory.

    Args:
        model: the ``nn.Module`` (quantized in place; use the return value), or a factory
            function when used as ``@quantize`` / ``@quantize(bits=8)``.
        bits: 8 (``int8``), 4 (``int4-group``) or 16 (``fp16``), when ``scheme`` is not given.
        scheme, observer, backend, only, skip, scheme_options, observer_options,
            plugin_options, rules, calibration, sequential: as for :meth:`Engine.quantize` /
            :meth:`Engine.configure` (``calibration``: batches of model inputs, see
            docs/calibration.md).
        engine: an existing :class:`Engine` (default: a new one with all installed plugins).

    Returns:
        The quantized model (use :meth:`Engine.quantize` to also get the report), or a
        decorated factory.

    Example::

        qmodel = quantize(model, bits=8)

        @quantize(scheme="int8", skip=["head"])
        def build():
            return MyNet()
    """
    options = dict(
        bits=bits,
        scheme=scheme,
        observer=observer,
        backend=backend,
        only=only,
        skip=skip,
        scheme_options=scheme_options,
        observer_options=observer_options,
        plugin_options=plugin_options,
        rules=rules,
        calibration=calibration,
        sequential=sequential,
        engine=engine,
    )
    if model is None:
        return lambda factory: quantize(factory, **options)
    if not isinstance(model, nn.Module):
        if not callable(model):
            raise UsageError(
                f"quantize() got a {type(model).__name__}, not an nn.Module or a model factory",
                "pass the model object (or decorate a function that returns one)",
            )
        factory = model

        @functools.wraps(factory)
        def build(*args: Any, **kwargs: Any) -> nn.Module:
            built = factory(*args, **kwargs)
            if not isinstance(built, nn.Module):
                raise UsageError(
                    f"{getattr(factory, '__name__', 'the factory')} returned a "
                    f"{type(built).__name__}, not an nn.Module",
                    "return the model from the decorated function",
                )
            return quantize(built, **options)

        return build
    eng = engine or Engine()
    if scheme is None:
        b = 8 if bits is None else bits
        if b not in _SCHEME_FOR_BITS:
            raise UsageError(f"bits={b} is not supported", "use bits=8, 4 or 16, or scheme=...")
        scheme = _SCHEME_FOR_BITS[b]
    elif bits is not None:
        caps = eng.schemes.get(scheme).capabilities
        if caps.bits and bits not in caps.bits:
            raise UsageError(
                f"scheme {scheme!r} produces {'/'.join(map(str, caps.bits))}-bit codes, "
                f"not bits={bits}",
                "pass either bits or scheme, not both",
            )
    return eng.quantize(
        model,
        scheme=scheme,
        observer=observer,
        backend=backend,
        only=only,
        skip=skip,
        scheme_options=scheme_options,
        observer_options=observer_options,
        plugin_options=plugin_options,
        rules=rules,
        calibration=calibration,
        sequential=sequential,
    ).model


def save(
    model: nn.Module,
    path: str,
    *,
    overwrite: bool = True,
    engine: Engine | None = None,
    serializer: str | None = None,
) -> None:
    """Save a (quantized) model atomically: a failed write leaves nothing behind.

    The file records the format version, each quantized tensor's scheme and configs, and
    every producing plugin with its distribution version.
    """
    (engine or Engine()).save(model, path, serializer=serializer, overwrite=overwrite)


def load(
    path: str,
    model: nn.Module | None = None,
    *,
    dequantize: bool = False,
    backend: str | None = None,
    engine: Engine | None = None,
) -> Any:
    """Load a saved file.

    Args:
        path: a file written by :func:`save` or ``monoquant quantize``.
        model: a freshly built float model of the same architecture; its layers are replaced
            by quantized ones (the model is returned; outputs are bit-identical to the model
            that was saved).
        dequantize: return a plain float ``state_dict`` instead (loads into the unquantized
            model with ``strict=True``; works without the producing plugin for schemes with
            the standard affine layout).
        backend: force a backend (default: chosen per layer by capability).

    Raises:
        FormatError: not a valid file, a newer format version, an unknown scheme (naming the
            plugin to install), or a file that does not match ``model``.
    """
    return (engine or Engine()).load(path, model, dequantize=dequantize, backend=backend)
