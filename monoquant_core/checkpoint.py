"""File reading and writing: atomic writes, model <-> Artifact, load into a model.

Writes always go to a temporary file next to the target and are renamed into place only when
complete, so a failed or killed write never leaves a partial output.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from .components import Artifact, QuantizedModule, Scheme, Serializer, WeightInfo
from .errors import FormatError, UsageError
from .qtensor import QTensor

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

__all__ = ["atomic_write", "check_output_path", "load_model", "model_artifact", "save_model"]


def check_output_path(path: str, overwrite: bool = True) -> str:
    """Validate an output path before any work; returns its absolute form."""
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    if os.path.isdir(path):
        raise UsageError(
            f"output {path!r} is a directory", "give a file path, e.g. model.safetensors"
        )
    if not os.path.isdir(parent):
        raise UsageError(
            f"output directory {parent!r} does not exist",
            f"create it first (mkdir -p {parent}) or choose another output path",
        )
    if not overwrite and os.path.exists(path):
        raise UsageError(
            f"output {path!r} already exists", "pass --overwrite or choose another path"
        )
    return path


def atomic_write(path: str, write: Callable[[str], None], overwrite: bool = True) -> None:
    """Call ``write(tmp_path)`` then rename ``tmp_path`` to ``path``; clean up on any failure."""
    path = check_output_path(path, overwrite)
    fd, tmp = tempfile.mkstemp(
        prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=os.path.dirname(path)
    )
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise UsageError(
            f"cannot write {path!r}: {e.strerror or e}",
            "check free disk space and write permission of the output directory",
        ) from e
    except BaseException:
        _remove(tmp)
        raise


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


def model_artifact(engine: Engine, model: nn.Module) -> Artifact:
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
    art.producers = producers(engine, [qt.meta.get("plugin") for qt in art.qtensors.values()])
    return art


def producers(engine: Engine, plugins: list[str | None]) -> dict[str, dict[str, str]]:
    """``plugin -> {distribution, version}`` for the core and every named plugin."""
    out: dict[str, dict[str, str]] = {}
    for plugin in ["core", *plugins]:
        if not plugin or plugin in out:
            continue
        try:
            info = engine.plugin_info(plugin)
            out[plugin] = {"distribution": info.distribution or "", "version": info.version or ""}
        except KeyError:
            out[plugin] = {"distribution": "", "version": ""}
    return out


def _serializer_for_write(engine: Engine, path: str, name: str | None) -> Serializer:
    if name:
        return engine.serializers.get(name)
    for reg in engine.serializers:
        if any(path.endswith(s) for s in reg.component.suffixes):
            return reg.component
    if "safetensors" in engine.serializers:
        return engine.serializers.get("safetensors")
    raise UsageError("no serializer is installed", "reinstall monoquant (it ships 'safetensors')")


def _serializer_for_read(engine: Engine, path: str) -> Serializer:
    if not os.path.exists(path):
        raise UsageError(f"file {path!r} does not exist", "check the path")
    if os.path.isdir(path):
        raise UsageError(f"{path!r} is a directory, not a file", "give the path of a saved file")
    for reg in engine.serializers:
        try:
            if reg.component.sniff(path):
                return reg.component
        except OSError as e:
            raise UsageError(f"cannot read {path!r}: {e.strerror or e}", "check permissions") from e
    known = ", ".join(engine.serializers.names()) or "none"
    raise FormatError(
        f"{path!r} is not in a format any installed serializer reads (installed: {known})",
        "give a file written by `monoquant quantize` / monoquant_core.save()",
    )


def save_model(
    engine: Engine,
    model: nn.Module,
    path: str,
    *,
    serializer: str | None = None,
    overwrite: bool = True,
) -> None:
    """Write ``model`` (quantized modules as QTensors, everything else as-is) atomically."""
    check_output_path(path, overwrite)
    ser = _serializer_for_write(engine, os.fspath(path), serializer)
    art = model_artifact(engine, model)
    atomic_write(path, lambda tmp: ser.write(art, tmp), overwrite)


def scheme_for(
    engine: Engine, path: str, name: str, qt: QTensor, producers: dict[str, dict[str, str]]
) -> Scheme:
    """The installed scheme of ``qt``, or a FormatError naming the package to install."""
    if qt.scheme in engine.schemes:
        return engine.schemes.get(qt.scheme)
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
    engine: Engine, path: str, name: str, qt: QTensor, producers: dict[str, dict[str, str]]
) -> torch.Tensor:
    """Float weight of ``qt``; works without the producing plugin for the affine layout."""
    if qt.scheme not in engine.schemes and qt.meta.get("layout") == "affine":
        return qt.dequantize()
    return scheme_for(engine, path, name, qt, producers).dequantize(qt)


def load_model(
    engine: Engine,
    path: str,
    model: nn.Module | None = None,
    *,
    dequantize: bool = False,
    backend: str | None = None,
) -> Any:
    """See :func:`monoquant_core.load`."""
    path = os.fspath(path)
    art = _serializer_for_read(engine, path).read(path)
    if dequantize:
        out = dict(art.tensors)
        for name, qt in art.qtensors.items():
            out[name] = dequantize_qtensor(engine, path, name, qt, art.producers)
        return out
    if model is None:
        raise UsageError(
            "load() needs the model to rebuild quantized layers into",
            "call load(path, model) with a freshly built float model, or "
            "load(path, dequantize=True) for a plain float state_dict",
        )
    return _rebuild(engine, path, art, model, backend)


def _rebuild(
    engine: Engine, path: str, art: Artifact, model: nn.Module, backend: str | None
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
        reg = engine.replacers.for_type(type(module))
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
            scheme = scheme_for(engine, path, f"{mname}.{pname}", qt, art.producers)
            if pname not in weights or tuple(weights[pname].shape) != qt.shape:
                have = tuple(weights[pname].shape) if pname in weights else None
                raise FormatError(
                    f"{os.path.basename(path)}: {mname}.{pname} has shape {qt.shape} in the "
                    f"file but {have} in the model",
                    "pass the same model architecture the file was produced from",
                )
        device = next(iter(weights.values())).device.type
        info = WeightInfo.of(next(iter(qweights.values())), device)
        be_name, _ = engine.choose_backend(info, backend)
        new = replacer.replace(module, qweights, engine.backends.get(be_name), scheme)
        if isinstance(new, QuantizedModule):
            new.backend_candidates = engine.ranked_backends()
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
    missing = sorted(set(expected) - set(art.tensors))
    extra = sorted(set(art.tensors) - set(expected))
    wrong = sorted(
        k for k in set(expected) & set(art.tensors) if tuple(art.tensors[k].shape) != expected[k]
    )
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
            "pass the same model architecture the file was produced from",
        )
    from .engine import _swap

    for mname, m in new_modules.items():
        model = _swap(model, mname, m)
    model.load_state_dict(art.tensors, strict=False)
    return model
