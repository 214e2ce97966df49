"""``safetensors`` serializer: the Mono Quant on-disk format (``format_version`` 1).

For each quantized tensor ``<name>``: ``<name>.qdata``, ``<name>.scale``, optionally
``<name>.zero_point`` and any scheme extras ``<name>.<role>``; other tensors unchanged. The
header's ``__metadata__`` holds ``format = "monoquant"``, ``format_version``, ``quantization``
(JSON per tensor), ``producers`` (JSON plugin -> distribution/version) and ``config``.
A file without ``format = "monoquant"`` is read as a plain float checkpoint.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from monoquant_core import Artifact, FormatError, QTensor, Serializer, UsageError, hookimpl

FORMAT_VERSION = 1
_DTYPES = {
    str(d).replace("torch.", ""): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}
_STRUCT = ("scheme", "bits", "group_size", "axis", "symmetric", "shape", "dtype", "roles")


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


class SafetensorsSerializer(Serializer):
    name = "safetensors"
    suffixes = (".safetensors",)

    def sniff(self, path: str) -> bool:
        size = os.path.getsize(path)
        with open(path, "rb") as f:
            head = f.read(9)
        if len(head) < 9:
            return False
        (n,) = struct.unpack("<Q", head[:8])
        return 2 <= n <= size - 8 and head[8:9] == b"{"

    def write(self, artifact: Artifact, path: str) -> None:
        tensors: dict[str, torch.Tensor] = {}
        quant: dict[str, dict[str, Any]] = {}
        for name, t in artifact.tensors.items():
            tensors[name] = t
        for name, qt in artifact.qtensors.items():
            roles = qt.tensors()
            for role, t in roles.items():
                key = f"{name}.{role}"
                if key in tensors:
                    raise UsageError(
                        f"cannot save: tensor name {key!r} is used twice",
                        "rename the module or parameter that ends in '.{role}'",
                    )
                tensors[key] = t
            quant[name] = {
                "scheme": qt.scheme,
                "bits": qt.bits,
                "group_size": qt.group_size,
                "axis": qt.axis,
                "symmetric": qt.symmetric,
                "shape": list(qt.shape),
                "dtype": _dtype_name(qt.dtype),
                "roles": list(roles),
                **{k: v for k, v in qt.meta.items() if k not in _STRUCT},
            }
        metadata = {
            "format": "monoquant",
            "format_version": str(FORMAT_VERSION),
            "quantization": json.dumps(quant, sort_keys=True),
            "producers": json.dumps(artifact.producers, sort_keys=True),
            "config": json.dumps(artifact.config, sort_keys=True, default=str),
        }
        save_file(_unshare(tensors), path, metadata=metadata)

    def read(self, path: str) -> Artifact:
        base = os.path.basename(path)
        try:
            with safe_open(path, framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
        except (SafetensorError, RuntimeError, ValueError, TypeError) as e:
            raise FormatError(
                f"{base} is not a readable safetensors file: {e}",
                "the file is truncated or corrupted; write it again",
            ) from None
        except OSError as e:
            raise UsageError(f"cannot read {path!r}: {e.strerror or e}", "check permissions") from e
        if meta.get("format") != "monoquant":
            return Artifact(tensors=tensors)
        version = _parse_version(base, meta.get("format_version"))
        quant = _json(base, meta, "quantization")
        producers = _json(base, meta, "producers")
        config = _json(base, meta, "config")
        art = Artifact(producers=producers, config=config, format_version=version)
        for name, info in quant.items():
            art.qtensors[name] = _qtensor(base, name, info, tensors)
        art.tensors = tensors
        return art


def _unshare(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Contiguous CPU tensors; storage shared between names is copied (safetensors refuses it)."""
    seen: set[tuple[int, int]] = set()
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu").contiguous()
        key = (t.untyped_storage().data_ptr(), t.untyped_storage().nbytes())
        if key in seen or t.untyped_storage().nbytes() != t.numel() * t.element_size():
            t = t.clone()
        seen.add((t.untyped_storage().data_ptr(), t.untyped_storage().nbytes()))
        out[k] = t
    return out


def _parse_version(base: str, raw: Any) -> int:
    try:
        version = int(raw)
    except (TypeError, ValueError):
        raise FormatError(
            f"{base} has an invalid format_version {raw!r}", "write the file again"
        ) from None
    if version > FORMAT_VERSION:
        raise FormatError(
            f"{base} was written in format version {version} by a newer Mono Quant; this one "
            f"reads up to version {FORMAT_VERSION}",
            "upgrade: pip install -U monoquant",
        )
    if version < 1:
        raise FormatError(f"{base} has an invalid format_version {version}", "write it again")
    return version


def _json(base: str, meta: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(meta.get(key, "{}"))
    except json.JSONDecodeError as e:
        raise FormatError(
            f"{base}: metadata {key!r} is not valid JSON ({e})", "write it again"
        ) from None
    if not isinstance(value, dict):
        raise FormatError(f"{base}: metadata {key!r} is not a JSON object", "write it again")
    return value


def _qtensor(base: str, name: str, info: Any, tensors: dict[str, torch.Tensor]) -> QTensor:
    try:
        roles = list(info["roles"])
        parts = {}
        for role in roles:
            key = f"{name}.{role}"
            if key not in tensors:
                raise FormatError(
                    f"{base}: quantized tensor {name!r} lacks its {role!r} data ({key!r})",
                    "the file is incomplete; write it again",
                )
            parts[role] = tensors.pop(key)
        dtype = _DTYPES[info["dtype"]]
        qt = QTensor(
            qdata=parts.pop("qdata"),
            scale=parts.pop("scale"),
            zero_point=parts.pop("zero_point", None),
            bits=int(info["bits"]),
            group_size=None if info["group_size"] is None else int(info["group_size"]),
            axis=None if info["axis"] is None else int(info["axis"]),
            shape=tuple(int(s) for s in info["shape"]),
            dtype=dtype,
            scheme=str(info["scheme"]),
            extra=parts,
            meta={k: v for k, v in info.items() if k not in _STRUCT},
        )
        if bool(info["symmetric"]) != qt.symmetric:
            raise ValueError("'symmetric' disagrees with the presence of a zero point")
        qt.validate()
    except FormatError:
        raise
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise FormatError(
            f"{base}: quantized tensor {name!r} is inconsistent ({type(e).__name__}: {e})",
            "the file is corrupted or was edited; write it again",
        ) from None
    return qt


@hookimpl
def monoquant_register_serializers(register):
    register(SafetensorsSerializer())
