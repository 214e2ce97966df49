"""A finished tensor of a checkpoint run as a part file (:mod:`monoquant_core.journal`): a
plain safetensors file holding the QTensor's pieces (``t.qdata``, ``t.scale``, ...) and its
fields as JSON metadata. Written from views of the tensors (nothing copied) and read back as
views of one buffer; exact for every dtype a QTensor holds."""

from __future__ import annotations

import ctypes
import json
from typing import Any

import torch

from .qtensor import QTensor

__all__ = ["decode_part", "encode_part"]


#: safetensors dtype names of the tensors a QTensor holds
_DTYPES = {
    torch.float64: "F64", torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16",
    torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8",
    torch.uint8: "U8", torch.bool: "BOOL",
}  # fmt: skip
_TORCH = {v: k for k, v in _DTYPES.items()}


def encode_part(qt: QTensor) -> tuple[list[memoryview], dict[str, torch.Tensor]]:
    """A part file's bytes in pieces (a safetensors file: header, then each tensor's bytes as
    views of the tensors themselves: nothing is copied), and those tensors (the views do not
    keep them alive: the caller holds them until the bytes are written)."""
    tensors = {f"t.{role}": t.detach().cpu().contiguous() for role, t in qt.tensors().items()}
    fields = {
        "bits": qt.bits,
        "group_size": qt.group_size,
        "axis": qt.axis,
        "shape": list(qt.shape),
        "dtype": str(qt.dtype).replace("torch.", ""),
        "scheme": qt.scheme,
        "meta": qt.meta,
        "zero_point": qt.zero_point is not None,
        "extra": list(qt.extra),
    }
    header: dict[str, Any] = {"__metadata__": {"qtensor": json.dumps(fields)}}
    offset, views = 0, []
    for key, t in tensors.items():
        n = t.numel() * t.element_size()
        header[key] = {"dtype": _DTYPES[t.dtype], "shape": list(t.shape),
                       "data_offsets": [offset, offset + n]}  # fmt: skip
        offset += n
        if n:
            views.append(memoryview((ctypes.c_ubyte * n).from_address(t.data_ptr())))
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * ((-len(raw)) % 8)
    return [memoryview(len(raw).to_bytes(8, "little") + raw), *views], tensors


def decode_part(data: bytearray) -> QTensor:
    n = int.from_bytes(data[:8], "little")
    header = json.loads(bytes(data[8 : 8 + n]))
    fields = json.loads(header.pop("__metadata__")["qtensor"])
    tensors = {}
    for key, info in header.items():
        start, stop = info["data_offsets"]
        dtype = _TORCH[info["dtype"]]
        count = (stop - start) // torch.empty(0, dtype=dtype).element_size()
        flat = (
            torch.frombuffer(data, dtype=dtype, count=count, offset=8 + n + start)
            if count
            else torch.empty(0, dtype=dtype)
        )
        tensors[key] = flat.reshape(info["shape"])
    return QTensor(
        qdata=tensors["t.qdata"],
        scale=tensors["t.scale"],
        zero_point=tensors["t.zero_point"] if fields["zero_point"] else None,
        bits=fields["bits"],
        group_size=fields["group_size"],
        axis=fields["axis"],
        shape=tuple(fields["shape"]),
        dtype=getattr(torch, fields["dtype"]),
        scheme=fields["scheme"],
        extra={k: tensors[f"t.{k}"] for k in fields["extra"]},
        meta=fields["meta"],
    )
