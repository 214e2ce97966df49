"""``safetensors`` serializer: the Mono Quant on-disk format (``format_version`` 1).

For each quantized tensor ``<name>``: ``<name>.qdata``, ``<name>.scale``, optionally
``<name>.zero_point`` and any scheme extras ``<name>.<role>``; other tensors unchanged. The
header's ``__metadata__`` holds ``format = "monoquant"``, ``format_version``, ``quantization``
(JSON per tensor), ``producers`` (JSON plugin -> distribution/version) and ``config``.
A file without ``format = "monoquant"`` is read as a plain float checkpoint.
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

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
        }
        if artifact.config:
            metadata["config"] = json.dumps(artifact.config, sort_keys=True, default=str)
        write_safetensors(path, tensors, metadata)

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


_ST_DTYPES = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
for _name, _st in (
    ("float8_e4m3fn", "F8_E4M3"),
    ("float8_e5m2", "F8_E5M2"),
    ("uint16", "U16"),
    ("uint32", "U32"),
    ("uint64", "U64"),
):
    if hasattr(torch, _name):
        _ST_DTYPES[getattr(torch, _name)] = _st


def write_safetensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write a safetensors file tensor by tensor (no NumPy, no second copy of the model).

    Follows the safetensors layout: an 8-byte little-endian header length, a JSON header
    (padded with spaces to a multiple of 8) and the raw little-endian tensor bytes.
    """
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    # Largest elements first (as safetensors itself does): every tensor's data then starts at
    # a multiple of its element size, so readers that map the file can use it in place.
    tensors = dict(sorted(tensors.items(), key=lambda kv: -kv[1].element_size()))
    for name, t in tensors.items():
        if t.dtype not in _ST_DTYPES:
            raise UsageError(
                f"cannot save tensor {name!r}: dtype {t.dtype} has no safetensors equivalent",
                "convert it to a standard dtype first",
            )
        nbytes = t.numel() * t.element_size()
        header[name] = {
            "dtype": _ST_DTYPES[t.dtype],
            "shape": list(t.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for t in tensors.values():
            _write_tensor(f, t)


def _write_tensor(f: Any, t: torch.Tensor) -> None:
    t = t.detach().to("cpu").contiguous()
    if t.numel() == 0:
        return
    if sys.byteorder != "little" and t.element_size() > 1:  # pragma: no cover - big-endian only
        t = t.view(torch.uint8).reshape(-1, t.element_size()).flip(1).contiguous()
    buf = (ctypes.c_char * (t.numel() * t.element_size())).from_address(t.data_ptr())
    f.write(memoryview(buf))


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
