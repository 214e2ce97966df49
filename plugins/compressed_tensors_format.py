"""``compressed-tensors`` serializer: the format llm-compressor writes and transformers and vLLM
load (``quant_method: compressed-tensors``), for ``int8`` and ``int4-group`` Linear weights.

Per quantized weight ``<m>.weight`` (a 2-D ``[out, in]`` weight; the module ``<m>``):

* ``int4-group`` ("pack-quantized"): ``<m>.weight_packed`` int32 ``[out, in / 8]`` (eight
  4-bit values per word, the first in the low bits, each stored as ``q + 8`` for the signed
  ``q`` in -8..7), ``<m>.weight_scale`` ``[out, in / group]`` (the stored scale dtype),
  ``<m>.weight_shape`` int64 ``[2]``, and for asymmetric weights ``<m>.weight_zero_point``,
  signed int zero points packed the same way along ``out`` (int32 ``[out / 8, in / group]``).
  Mono Quant's unsigned asymmetric codes ``u`` with zero point ``z`` are ``q = u - 8`` with zero
  point ``z - 8``, so the stored nibbles are the same bytes; symmetric two's complement nibbles
  are XOR-ed with 8. The zero points must be integers (``--scheme-opt zero=int`` or
  ``symmetric=true``): compressed-tensors has no float zero point.
* ``int8`` ("int-quantized"): ``<m>.weight`` int8 ``[out, in]`` and ``<m>.weight_scale``
  ``[out, 1]`` (per channel) or ``[1]`` (per tensor); symmetric only.

Other tensors are written unchanged. ``activations="dynamic"`` (per-token int8 inputs) and
``"dynamic-tensor"`` become the scheme's ``input_activations``. What compressed-tensors cannot
hold (float zero points, the ``outlier`` plugin's float columns, calibrated static input
scales, other schemes, other weight shapes) is refused with a one-line error before anything
is written. The ``quantization_config`` for the output's ``config.json`` (checkpoint mode and
``monoquant export`` on a transformers folder) comes from :meth:`hf_quantization_config`.

The file's ``__metadata__`` also records each weight's Mono Quant facts (``monoquant``, JSON),
so Mono Quant reads its own exports back (``inspect``, ``verify``, ``load``) exactly; other
loaders ignore it.
"""

from __future__ import annotations

import json
from typing import Any

import torch

from monoquant_core import (
    ArtifactReader,
    FormatError,
    QTensor,
    Serializer,
    TensorSource,
    UsageError,
    hookimpl,
)

from .safetensors_io import SafetensorsReader, is_safetensors
from .safetensors_writer import SafetensorsArtifactWriter, StreamingSerializer

_FIX = (
    "quantize with a scheme compressed-tensors can hold (int8 symmetric, int4-group with "
    "symmetric=true or zero=int), or keep the default safetensors format"
)
_FLOATS = {
    str(d).replace("torch.", ""): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}


def _why_not(name: str, qt: QTensor) -> str | None:
    """What in ``qt`` compressed-tensors cannot store, or None."""
    pname = name.rpartition(".")[2]
    if pname != "weight" or len(qt.shape) != 2 or qt.axis not in (0, None):
        return "it (only 2-D [out, in] Linear weights named <module>.weight)"
    if qt.extra:
        return f"the extra tensors {sorted(qt.extra)} (outlier columns or static input scales)"
    if qt.activations not in ("none", *_INPUTS):
        return f"activations={qt.activations!r} inputs"
    k = qt.shape[1]
    if qt.scheme == "int4-group" and qt.bits == 4:
        gs = qt.group_size
        if gs is None or k % gs or k % 8:
            return f"a group size that does not divide in_features ({k})"
        if not qt.symmetric:
            z = qt.zero_point.to(torch.float32)
            if not torch.equal(z, z.round()) or z.min() < 0 or z.max() > 15:
                return "float zero points (int4-group's default zero=float)"
        return None
    if qt.scheme == "int8" and qt.bits == 8 and qt.group_size is None:
        return None if qt.symmetric else "asymmetric int8 weights (use symmetric int8)"
    return f"{qt.scheme} ({qt.bits}-bit) weights"


def _pack_rows(zp: torch.Tensor) -> torch.Tensor:
    """Signed 4-bit zero points ``[N, G]`` packed along ``N``: int32 ``[ceil(N / 8), G]``."""
    n, g = zp.shape
    u = (zp + 8).to(torch.uint8).t().contiguous()  # [G, N]
    pad = (-n) % 8
    if pad:
        u = torch.cat([u, torch.zeros(g, pad, dtype=torch.uint8)], dim=1)
    return _as_int32(u[:, 0::2] | (u[:, 1::2] << 4)).t().contiguous()


def _as_int32(b: torch.Tensor) -> torch.Tensor:
    """Rows of bytes (a multiple of 4 each) as rows of little-endian int32 words."""
    return b.contiguous().reshape(-1).view(torch.int32).reshape(b.shape[0], -1)


def _unpack_rows(packed: torch.Tensor, n: int) -> torch.Tensor:
    b = packed.t().contiguous().view(torch.uint8)  # [G, ceil(N/8) * 4]
    u = torch.stack([b & 15, b >> 4], dim=-1).reshape(b.shape[0], -1)[:, :n]
    return u.t().to(torch.int16) - 8


def _args(facts: dict[str, Any]) -> dict[str, Any]:
    strategy = "group" if facts["bits"] == 4 else "channel" if facts["axis"] == 0 else "tensor"
    return {
        "num_bits": facts["bits"],
        "type": "int",
        "symmetric": facts["symmetric"],
        "strategy": strategy,
        "group_size": facts["group_size"],
        "dynamic": False,
        "scale_dtype": f"torch.{facts['scale_dtype']}",
    }


_INPUTS = {
    "dynamic": {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token",
                "dynamic": True},
    "dynamic-tensor": {"num_bits": 8, "type": "int", "symmetric": False, "strategy": "tensor",
                       "dynamic": True},
}  # fmt: skip


class CompressedTensorsSerializer(StreamingSerializer):
    name = "compressed-tensors"
    suffixes = ()  # chosen by name only (--format compressed-tensors)

    def sniff(self, path: str) -> bool:
        if not is_safetensors(path):
            return False
        try:
            with SafetensorsReader(path) as r:
                return r.metadata.get("monoquant_format") == self.name
        except FormatError:
            return False

    def open_reader(self, path: str) -> CompressedTensorsReader:
        return CompressedTensorsReader(path)

    def open_writer(self, path: str) -> CompressedTensorsWriter:
        return CompressedTensorsWriter(self, path)

    unsupported_fix = _FIX

    def unsupported(self, name: str, qt: QTensor) -> str | None:
        why = _why_not(name, qt)
        return None if why is None else f"compressed-tensors cannot store {why}"

    def hf_quantization_config(self, qtensors: dict[str, dict[str, Any]]) -> dict[str, Any]:
        groups: dict[str, dict[str, Any]] = {}
        formats = set()
        for name, facts in sorted(qtensors.items()):
            weights = _args(facts)
            inputs = _INPUTS.get(facts.get("activations", "none"))
            fmt = "pack-quantized" if facts["bits"] == 4 else "int-quantized"
            key = json.dumps([weights, inputs, fmt], sort_keys=True)
            group = groups.setdefault(
                key,
                {
                    "targets": [],
                    "weights": weights,
                    "input_activations": inputs,
                    "output_activations": None,
                    "format": fmt,
                },
            )
            group["targets"].append(name.rpartition(".")[0])
            formats.add(fmt)
        return {
            "quant_method": "compressed-tensors",
            "format": formats.pop() if len(formats) == 1 else "mixed-precision",
            "quantization_status": "compressed",
            "config_groups": {f"group_{i}": g for i, g in enumerate(groups.values())},
            "ignore": [],
            "kv_cache_scheme": None,
        }


class CompressedTensorsWriter(SafetensorsArtifactWriter):
    """Streams tensors into one safetensors file in compressed-tensors naming."""

    def __init__(self, serializer: Serializer, path: str):
        super().__init__(serializer, path)
        self._facts: dict[str, dict[str, Any]] = {}

    def add_qtensor(self, name: str, qt: QTensor) -> None:
        why = _why_not(name, qt)
        if why is not None:
            raise UsageError(f"{name}: compressed-tensors cannot store {why}", _FIX)
        m = name.rpartition(".")[0]
        n, k = qt.shape
        out: dict[str, torch.Tensor] = {}
        if qt.bits == 4:
            gs = qt.group_size
            if qt.symmetric:
                codes = torch.bitwise_xor(qt.qdata, 0x88)  # two's complement -> q + 8
            else:
                zero = qt.zero_point.to(torch.float32).to(torch.int16) - 8  # signed zero point
                out[f"{m}.weight_zero_point"] = _pack_rows(zero)
                codes = qt.qdata  # unsigned u is q + 8 for q = u - 8: the same nibbles
            out[f"{m}.weight_packed"] = _as_int32(codes.reshape(n, k // 2))
            out[f"{m}.weight_scale"] = qt.scale.reshape(n, k // gs)
            out[f"{m}.weight_shape"] = torch.tensor([n, k], dtype=torch.int64)
        else:
            out[f"{m}.weight"] = qt.qdata.reshape(n, k)
            out[f"{m}.weight_scale"] = qt.scale.reshape((n, 1) if qt.axis == 0 else (1,))
        for key, t in out.items():
            self._w.add(key, t)
        self._stored[name] = list(out)
        self._facts[name] = {**qt.facts(), "meta": qt.meta}

    def close(self, producers: dict[str, dict[str, str]], config: dict[str, Any]) -> int:
        metadata = {
            "format": "pt",
            "monoquant_format": "compressed-tensors",
            "monoquant": json.dumps(self._facts, sort_keys=True, default=str),
            "producers": json.dumps(producers, sort_keys=True),
        }
        if config:
            metadata["config"] = json.dumps(config, sort_keys=True, default=str)
        return self._w.close(metadata)


class CompressedTensorsReader(ArtifactReader):
    """Reads back a file this serializer wrote (its ``monoquant`` metadata says which tensors
    are quantized and how)."""

    def __init__(self, path: str):
        self.path = path
        self._r = SafetensorsReader(path)
        meta = self._r.metadata
        try:
            self._facts = json.loads(meta.get("monoquant", "{}"))
            self._producers = json.loads(meta.get("producers", "{}"))
            self.config = json.loads(meta["config"]) if "config" in meta else {}
        except ValueError as e:
            raise FormatError(
                f"{path}: the compressed-tensors file's Mono Quant metadata is not JSON ({e})",
                "export the model again with monoquant export",
            ) from None
        self._names: list[str] = list(self._r.keys())
        present = set(self._names)
        self._pieces: set[str] = set()
        for name in self._facts:
            m = name.rpartition(".")[0]
            for suffix in ("weight", "weight_packed", "weight_scale", "weight_zero_point",
                           "weight_shape"):  # fmt: skip
                if f"{m}.{suffix}" in present:
                    self._pieces.add(f"{m}.{suffix}")

    @property
    def producers(self) -> dict[str, dict[str, str]]:
        return self._producers

    @property
    def format_version(self) -> int:
        return 1

    @property
    def quantized_file(self) -> bool:
        return True

    def tensor_names(self) -> list[str]:
        return [k for k in self._names if k not in self._pieces]

    def qtensor_names(self) -> list[str]:
        return list(self._facts)

    def stored_names(self) -> set[str]:
        return set(self._names)

    def source(self, name: str) -> TensorSource:
        r = self._r
        return TensorSource(
            name, r.dtype(name), r.shape(name), r.nbytes(name), lambda: r.get(name),
            lambda out: r.copy_to(name, out),
        )  # fmt: skip

    def qinfo(self, name: str) -> dict[str, Any]:
        f = self._facts[name]
        m = name.rpartition(".")[0]
        nbytes = sum(self._r.nbytes(k) for k in self._pieces if k.rpartition(".")[0] == m)
        return {**{k: f[k] for k in ("scheme", "bits", "group_size", "axis", "shape", "dtype")},
                "nbytes": nbytes, **f.get("meta", {})}  # fmt: skip

    def qtensor(self, name: str) -> QTensor:
        f = self._facts[name]
        m = name.rpartition(".")[0]
        n, k = f["shape"]
        dtype = _FLOATS.get(f["dtype"], torch.float32)
        scale = self._r.get(f"{m}.weight_scale")
        if f["bits"] == 4:
            gs = f["group_size"]
            codes = self._r.get(f"{m}.weight_packed").contiguous().view(torch.uint8)
            zero = None
            if f["symmetric"]:
                codes = torch.bitwise_xor(codes, 0x88)
            else:
                z = _unpack_rows(self._r.get(f"{m}.weight_zero_point"), n)
                zero = (z + 8).to(scale.dtype)
            return QTensor(
                codes.reshape(n, k // 2), scale.reshape(n, k // gs), zero, 4, gs, 0, (n, k),
                dtype, "int4-group", meta=dict(f.get("meta", {})),
            )  # fmt: skip
        axis = f["axis"]
        return QTensor(
            self._r.get(f"{m}.weight").reshape(n, k), scale.reshape(-1, 1), None, 8, None, axis,
            (n, k), dtype, "int8", meta=dict(f.get("meta", {})),
        )  # fmt: skip

    def close(self) -> None:
        self._r.close()


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "compressed-tensors"


@hookimpl
def monoquant_register_serializers(register):
    register(CompressedTensorsSerializer())


__all__ = ["CompressedTensorsSerializer"]
