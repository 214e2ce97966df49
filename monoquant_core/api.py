"""The user verbs: ``quantize`` (also a decorator of a model factory), ``save`` and ``load``.

Thin wrappers over :class:`~monoquant_core.engine.Engine` for the common case; use an Engine
directly for the report and every option.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import Any

from torch import nn

from .engine import Engine
from .errors import UsageError

__all__ = ["load", "quantize", "save"]

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
        return _decorated(model, options)
    eng = engine or Engine()
    run_options = {k: v for k, v in options.items() if k not in ("bits", "engine")}
    run_options["scheme"] = _scheme_for(eng, scheme, bits)
    return eng.quantize(model, **run_options).model


def _scheme_for(engine: Engine, scheme: str | None, bits: int | None) -> str:
    """The scheme ``quantize(bits=..., scheme=...)`` means (both given: they must agree)."""
    if scheme is None:
        b = 8 if bits is None else bits
        if b not in _SCHEME_FOR_BITS:
            raise UsageError(f"bits={b} is not supported", "use bits=8, 4 or 16, or scheme=...")
        return _SCHEME_FOR_BITS[b]
    caps = engine.schemes.get(scheme).capabilities
    if bits is not None and caps.bits and bits not in caps.bits:
        raise UsageError(
            f"scheme {scheme!r} produces {'/'.join(map(str, caps.bits))}-bit codes, "
            f"not bits={bits}",
            "pass either bits or scheme, not both",
        )
    return scheme


def _decorated(factory: Any, options: dict[str, Any]) -> Callable[..., nn.Module]:
    """``factory`` wrapped so that the model it returns is quantized with ``options``."""
    if not callable(factory):
        raise UsageError(
            f"quantize() got a {type(factory).__name__}, not an nn.Module or a model factory",
            "pass the model object (or decorate a function that returns one)",
        )

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
    strict: bool = True,
    engine: Engine | None = None,
) -> Any:
    """Load a saved file, or a folder of shards written by checkpoint mode.

    Args:
        path: a file written by :func:`save` or ``monoquant quantize``, or an output folder
            of ``monoquant quantize FOLDER -o OUT`` (its shards, with or without the index).
        model: a freshly built float model of the same architecture; its layers are replaced
            by quantized ones (the model is returned; outputs are bit-identical to the model
            that was saved).
        dequantize: return a plain float ``state_dict`` instead (loads into the unquantized
            model with ``strict=True``; works without the producing plugin for schemes with
            the standard affine layout).
        backend: force a backend (default: chosen per layer by capability).
        strict: with the default True, every float tensor of the model must be in the file
            and every tensor of the file in the model (a tensor for a buffer the model
            registers with ``persistent=False``, such as a Hugging Face model's
            ``position_ids``, is accepted and left to the model). False allows missing and
            extra float tensors with one warning naming them; shapes must still match, and
            quantized tensors must still have their layer.

    Raises:
        FormatError: not a valid file, a newer format version, an unknown scheme (naming the
            plugin to install), or a file that does not match ``model``.
    """
    return (engine or Engine()).load(
        path, model, dequantize=dequantize, backend=backend, strict=strict
    )
