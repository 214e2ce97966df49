"""Saving and loading models: the model as an :class:`Artifact`, the one rule for choosing a
serializer, and rebuilding quantized modules into a freshly built model.

Writes are atomic (:mod:`monoquant_core.atomic`): a failed or killed save never leaves a
partial file.
"""

from __future__ import annotations

import os
import stat
import warnings
from typing import Any

import torch
from torch import nn

from .atomic import atomic_write, check_output_path
from .components import Artifact, Scheme, Serializer, WeightInfo
from .errors import FormatError, UsageError
from .qtensor import QTensor
from .quantized_module import QuantizedModule
from .registry import Registries, Registry, choose_backend, ranked_backends
from .swap import swap_module

__all__ = [
    "check_regular_file",
    "dequantize_qtensor",
    "load_model",
    "model_artifact",
    "producers",
    "save_model",
    "scheme_for",
    "serializer_for_read",
    "serializer_for_write",
]


def serializer_for_write(serializers: Registry, path: str, name: str | None = None) -> Serializer:
    """The serializer that writes ``path``: the one named, else the first (by name) whose
    suffixes match ``path``, else ``safetensors``."""
    if name:
        return serializers.get(name)
    for reg in serializers:
        if any(path.endswith(s) for s in reg.component.suffixes):
            return reg.component
    if "safetensors" in serializers:
        return serializers.get("safetensors")
    raise UsageError("no serializer is installed", "reinstall monoquant (it ships 'safetensors')")


def serializer_for_read(
    serializers: Registry,
    path: str,
    fix: str = "give a file written by `monoquant quantize` / monoquant_core.save()",
) -> Serializer:
    """The serializer whose ``sniff`` recognises the file at ``path`` (the one sniff loop)."""
    if not os.path.exists(path):
        raise UsageError(f"file {path!r} does not exist", "check the path")
    if os.path.isdir(path):
        raise UsageError(f"{path!r} is a directory, not a file", "give the path of a saved file")
    check_regular_file(path)
    for reg in serializers:
        try:
            if reg.component.sniff(path):
                return reg.component
        except OSError as e:
            raise UsageError(f"cannot read {path!r}: {e.strerror or e}", "check permissions") from e
    known = ", ".join(serializers.names()) or "none"
    raise FormatError(
        f"{path!r} is not in a format any installed serializer reads (installed: {known})", fix
    )


def check_regular_file(path: str) -> None:
    """Refuse a path that is not a regular file (a FIFO without a writer would block every
    reader forever; a device never ends) before anything opens it."""
    try:
        mode = os.stat(path).st_mode
    except OSError as e:
        raise UsageError(f"cannot read {path!r}: {e.strerror or e}", "check the path") from e
    if not stat.S_ISREG(mode):
        kind = (
            "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else ("a device" if stat.S_ISCHR(mode) or stat.S_ISBLK(mode) else "not a file")
        )
        raise UsageError(f"{path!r} is {kind}, not a regular file", "give the path of a saved file")


def model_artifact(registries: Registries, model: nn.Module) -> Artifact:
    """The model as data: QTensors of quantized modules plus every other state_dict tensor."""
    art = Artifact()
    skip: set[str] = set()
    for mname, m in model.named_modules():
        if isinstance(m, QuantizedModule):
            prefix = f"{mname}." if mname else ""
            for p, qt in m.qtensors().items():
                art.qtensors[prefix + p] = qt
            skip.update(prefix + b for b in m.qbuffer_names())
    for k, v in model.state_dict().items():
        if k not in skip:
            art.tensors[k] = v.detach()
    art.producers = producers(registries, [qt.meta.get("plugin") for qt in art.qtensors.values()])
    return art


def producers(registries: Registries, plugins: list[str | None]) -> dict[str, dict[str, str]]:
    """``plugin -> {distribution, version}`` for the core and every named plugin."""
    out: dict[str, dict[str, str]] = {}
    for plugin in ["core", *plugins]:
        if not plugin or plugin in out:
            continue
        info = registries.plugins.get(plugin)
        out[plugin] = {
            "distribution": (info.distribution if info else None) or "",
            "version": (info.version if info else None) or "",
        }
    return out


def save_model(
    registries: Registries,
    model: nn.Module,
    path: str,
    *,
    serializer: str | None = None,
    overwrite: bool = True,
) -> None:
    """Write ``model`` (quantized modules as QTensors, everything else as-is) atomically."""
    check_output_path(path, overwrite)
    ser = serializer_for_write(registries.serializers, os.fspath(path), serializer)
    art = model_artifact(registries, model)
    atomic_write(path, lambda tmp: ser.write(art, tmp), overwrite)


def scheme_for(
    schemes: Registry, path: str, name: str, qt: QTensor, producers: dict[str, dict[str, str]]
) -> Scheme:
    """The installed scheme of ``qt``, or a FormatError naming the package to install."""
    if qt.scheme in schemes:
        return schemes.get(qt.scheme)
    plugin = qt.meta.get("plugin") or "?"
    prod = producers.get(plugin, {})
    dist = prod.get("distribution") or f"the package providing plugin {plugin!r}"
    ver = prod.get("version")
    raise FormatError(
        f"{os.path.basename(path)}: tensor {name!r} uses scheme {qt.scheme!r} from plugin "
        f"{plugin!r} ({dist}{' ' + ver if ver else ''}), which is not installed",
        f"pip install {dist if prod.get('distribution') else '<that plugin>'}"
        + (" (or load with dequantize=True)" if qt.meta.get("layout") == "affine" else ""),
    )


def dequantize_qtensor(
    schemes: Registry, path: str, name: str, qt: QTensor, producers: dict[str, dict[str, str]]
) -> torch.Tensor:
    """Float weight of ``qt``; works without the producing plugin for the affine layout."""
    if qt.scheme not in schemes and qt.meta.get("layout") == "affine":
        return qt.dequantize()
    return scheme_for(schemes, path, name, qt, producers).dequantize(qt)


def load_model(
    registries: Registries,
    path: str,
    model: nn.Module | None = None,
    *,
    dequantize: bool = False,
    backend: str | None = None,
    strict: bool = True,
    artifact: Artifact | None = None,
) -> Any:
    """See :func:`monoquant_core.load`. ``artifact``: ``path`` already read (a folder of
    shards is read by :func:`monoquant_core.sources.read_artifact`)."""
    path = os.fspath(path)
    art = artifact or serializer_for_read(registries.serializers, path).read(path)
    if dequantize:
        out = dict(art.tensors)
        for name, qt in art.qtensors.items():
            out[name] = dequantize_qtensor(registries.schemes, path, name, qt, art.producers)
        return out
    if model is None:
        raise UsageError(
            "load() needs the model to rebuild quantized layers into",
            "call load(path, model) with a freshly built float model, or "
            "load(path, dequantize=True) for a plain float state_dict",
        )
    return _rebuild(registries, path, art, model, backend, strict)


def _rebuild(
    registries: Registries,
    path: str,
    art: Artifact,
    model: nn.Module,
    backend: str | None,
    strict: bool,
) -> nn.Module:
    by_module: dict[str, dict[str, QTensor]] = {}
    for name, qt in art.qtensors.items():
        mname, _, pname = name.rpartition(".")
        by_module.setdefault(mname, {})[pname] = qt
    new_modules: dict[str, nn.Module] = {}
    for mname, qweights in by_module.items():
        try:
            module = model.get_submodule(mname)
        except AttributeError:
            raise FormatError(
                f"{os.path.basename(path)} has quantized tensors for {mname!r}, which the "
                "model does not have",
                "pass the same model architecture the file was produced from",
            ) from None
        reg = registries.replacers.for_type(type(module))
        if reg is None:
            raise FormatError(
                f"{mname!r} is a {type(module).__name__} in the model, which no installed "
                "replacer can rebuild",
                "install the plugin that quantized it, or load with dequantize=True",
            )
        replacer = reg.component
        weights = replacer.weights(module)
        scheme = None
        for pname, qt in qweights.items():
            scheme = scheme_for(registries.schemes, path, f"{mname}.{pname}", qt, art.producers)
            if pname not in weights or tuple(weights[pname].shape) != qt.shape:
                have = tuple(weights[pname].shape) if pname in weights else None
                raise FormatError(
                    f"{os.path.basename(path)}: {mname}.{pname} has shape {qt.shape} in the "
                    f"file but {have} in the model",
                    "pass the same model architecture the file was produced from",
                )
        device = next(iter(weights.values())).device.type
        info = WeightInfo.of(next(iter(qweights.values())), device)
        be_name, _ = choose_backend(registries.backends, info, backend)
        new = replacer.replace(module, qweights, registries.backends.get(be_name), scheme)
        if isinstance(new, QuantizedModule):
            new.backend_candidates = ranked_backends(registries.backends)
            new.prepare()
        new_modules[mname] = new
    # Check the float tensors against what the rebuilt model expects before touching it.
    expected: dict[str, tuple[int, ...]] = {}
    for k, v in model.state_dict().items():
        if k.rpartition(".")[0] not in new_modules:
            expected[k] = tuple(v.shape)
    for mname, m in new_modules.items():
        prefix = f"{mname}." if mname else ""
        qb = set(m.qbuffer_names()) if isinstance(m, QuantizedModule) else set()
        expected.update(
            (prefix + k, tuple(v.shape)) for k, v in m.state_dict().items() if k not in qb
        )
    tensors = without_own_buffers(model, art.tensors, expected)
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(tensors) if tuple(tensors[k].shape) != expected[k]
    )
    if not strict and not wrong and (missing or extra):
        warnings.warn(
            f"load({os.path.basename(path)!r}, strict=False): "
            + "; ".join(
                f"{label} {_names(names)}"
                for label, names in (
                    ("missing from the file (the model keeps its values):", missing),
                    ("in the file but not in the model (ignored):", extra),
                )
                if names
            ),
            stacklevel=4,
        )
        for k in extra:
            tensors.pop(k)
        missing = extra = []
    if missing or extra or wrong:
        parts = [
            f"{label} {names[:5]}"
            for label, names in (
                ("missing", missing),
                ("unexpected", extra),
                ("wrong shape", wrong),
            )
            if names
        ]
        raise FormatError(
            f"{os.path.basename(path)} does not match the model: " + "; ".join(parts),
            "pass the same model architecture the file was produced from"
            + ("" if wrong else ", or load(..., strict=False) to allow missing/extra tensors"),
        )
    for mname, m in new_modules.items():
        model = swap_module(model, mname, m)
    model.load_state_dict(tensors, strict=False)
    return model


def without_own_buffers(
    model: nn.Module, tensors: dict[str, torch.Tensor], expected: Any = None
) -> dict[str, torch.Tensor]:
    """``tensors`` without the model's non-persistent buffers of the same shape (``expected``:
    the names the model's state_dict takes; default its own). A buffer registered with
    ``persistent=False`` (e.g. a Hugging Face model's ``position_ids``) is not in the
    state_dict, but older checkpoints hold it: the model builds its own, so such a tensor in
    the file is not an unexpected key."""
    persistent = set(model.state_dict())
    expected = persistent if expected is None else expected
    own = {k: tuple(b.shape) for k, b in model.named_buffers() if k not in persistent}
    return {k: v for k, v in tensors.items() if k in expected or own.get(k) != tuple(v.shape)}


def _names(names: list[str], shown: int = 5) -> str:
    more = f" and {len(names) - shown} more" if len(names) > shown else ""
    return ", ".join(names[:shown]) + more


def export_model_file(
    registries: Registries,
    src: str,
    dst: str,
    serializer: str,
    model: nn.Module,
    example: Any,
    art: Artifact,
    *,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Export ``art`` (the quantized file or folder ``src``, already read) of ``model`` to a
    format that holds the model graph (``Serializer.needs_model``, e.g. ONNX): ``model`` gets
    the file's dequantized weights (strictly), then the serializer traces it on ``example``
    and writes ``dst`` atomically."""
    out_format = registries.serializers.get(serializer)
    if not out_format.needs_model:
        raise UsageError(
            f"the {serializer} format stores tensors, not a model graph",
            "drop the model and example input, or choose a graph format such as onnx",
        )
    check_output_path(dst, overwrite)
    if not art.qtensors:
        raise UsageError(
            f"{src!r} holds no quantized tensor", "give the output of `monoquant quantize`"
        )
    state = without_own_buffers(
        model, load_model(registries, src, None, dequantize=True, artifact=art)
    )
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        first = " ".join(str(e).strip().splitlines()[:2])[:300]
        raise UsageError(
            f"{os.path.basename(src)} does not fit the model: {first}",
            "pass the model the file was quantized from",
        ) from None
    args = example if isinstance(example, tuple) else (example,)
    out: dict[str, Any] = {}

    def write(tmp: str) -> None:
        out.update(out_format.export_model(model, args, art, tmp))

    atomic_write(dst, write, overwrite)
    return out
