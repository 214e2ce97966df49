"""``safetensors`` serializer: the Mono Quant on-disk format (``format_version`` 1 and 2).

For each quantized tensor ``<name>``: ``<name>.qdata``, ``<name>.scale``, optionally
``<name>.zero_point`` and any scheme extras ``<name>.<role>``; other tensors unchanged. The
header's ``__metadata__`` holds ``format = "monoquant"``, ``format_version``, ``quantization``
(JSON per tensor), ``producers`` (JSON plugin -> distribution/version) and, when known,
``config``. A file without ``format = "monoquant"`` is read as a plain float checkpoint.

Version 2 adds guards: in the weights of a Hugging Face transformers folder
(:attr:`~monoquant_core.ArtifactWriter.for_transformers`), each quantized tensor ``<name>``
also has an empty ``uint8`` tensor stored under ``<name>`` itself. transformers without
``monoquant_core.hf`` imported then finds a size mismatch for every quantized weight and
raises, instead of leaving them randomly initialised; Mono Quant's readers skip the guards.
Files without guards are still written as version 1, so older readers keep reading them.

Reading and writing stream one tensor at a time (:mod:`monoquant_plugins.safetensors_io`,
:mod:`monoquant_plugins.safetensors_writer`), so checkpoint mode's memory is bounded by the
largest tensor.
"""

from __future__ import annotations

import functools
import json
import os
from typing import Any

import torch

from monoquant_core import (
    ArtifactReader,
    FormatError,
    QTensor,
    Serializer,
    TensorSource,
    __version__,
    hookimpl,
)

from .safetensors_io import SafetensorsReader, is_safetensors
from .safetensors_writer import SafetensorsArtifactWriter, SafetensorsWriter, StreamingSerializer

FORMAT_VERSION = 2
#: the version a file without guards is written in (every reader since the first reads it)
PLAIN_VERSION = 1
_DTYPES = {
    str(d).replace("torch.", ""): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64)
}
_STRUCT = ("scheme", "bits", "group_size", "axis", "symmetric", "shape", "dtype", "roles")


def _dtype_name(d: torch.dtype) -> str:
    return str(d).replace("torch.", "")


def write_safetensors(
    path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str]
) -> None:
    """Write plain tensors to a safetensors file (no NumPy needed)."""
    with SafetensorsWriter(path) as w:
        for name, t in tensors.items():
            w.add(name, t)
        w.close(metadata)


class SafetensorsSerializer(StreamingSerializer):
    name = "safetensors"
    suffixes = (".safetensors",)

    def sniff(self, path: str) -> bool:
        return is_safetensors(path)

    def open_reader(self, path: str) -> MonoQuantReader:
        return MonoQuantReader(path)

    def open_writer(self, path: str) -> MonoQuantWriter:
        return MonoQuantWriter(self, path)

    def hf_quantization_config(self, qtensors: dict[str, dict[str, Any]]) -> dict[str, Any]:
        """``quant_method: monoquant``: transformers loads the folder with Mono Quant's modules
        once ``monoquant_core.hf`` is imported (docs/checkpoints.md)."""
        return {
            "quant_method": "monoquant",
            "format": "monoquant-safetensors",
            "format_version": FORMAT_VERSION,
            "monoquant_version": __version__,
            "load_with": "pip install monoquant; import monoquant_core.hf before from_pretrained",
        }


class MonoQuantWriter(SafetensorsArtifactWriter):
    """Streams tensors into one safetensors file; QTensors become ``<name>.<role>`` entries."""

    def __init__(self, serializer: Serializer, path: str):
        super().__init__(serializer, path)
        self._quant: dict[str, dict[str, Any]] = {}

    def add_qtensor(self, name: str, qt: QTensor) -> None:
        roles = qt.tensors()
        guard = [name] if self.for_transformers else []
        for key in guard:  # empty: transformers alone reports a size mismatch and raises
            self._w.add(key, torch.empty(0, dtype=torch.uint8))
        for role, t in roles.items():
            self._w.add(f"{name}.{role}", t)
        self._stored[name] = guard + [f"{name}.{role}" for role in roles]
        self._quant[name] = {
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

    def close(self, producers: dict[str, dict[str, str]], config: dict[str, Any]) -> int:
        if not producers and not self._quant:  # nothing quantized, no provenance: plain file
            return self._w.close({"format": "pt"})
        guarded = any(name in self._stored[name] for name in self._quant)
        metadata = {
            "format": "monoquant",
            "format_version": str(FORMAT_VERSION if guarded else PLAIN_VERSION),
            "quantization": json.dumps(self._quant, sort_keys=True),
            "producers": json.dumps(producers, sort_keys=True),
        }
        if config:
            metadata["config"] = json.dumps(config, sort_keys=True, default=str)
        return self._w.close(metadata)


class MonoQuantReader(ArtifactReader):
    """Lazy reader: the header is validated up front, tensors are read on demand (positional
    reads, so from several threads at once)."""

    concurrent_loads = True

    def __init__(self, path: str):
        self.path = path
        self._r = SafetensorsReader(path)
        base = os.path.basename(path)
        try:
            meta = self._r.metadata
            self._mq = meta.get("format") == "monoquant"
            self.config: dict[str, Any] = {}
            self._producers: dict[str, dict[str, str]] = {}
            self._version = FORMAT_VERSION
            self._quant: dict[str, dict[str, Any]] = {}
            if self._mq:
                self._version = _parse_version(base, meta.get("format_version"))
                self._quant = _json(base, meta, "quantization")
                self._producers = _producers(base, _json(base, meta, "producers"))
                self.config = _json(base, meta, "config")
            self._pieces = self._check_pieces(base)
            self._guards = self._check_guards(base)
        except BaseException:
            self._r.close()
            raise

    def _check_pieces(self, base: str) -> set[str]:
        pieces: set[str] = set()
        for name, info in self._quant.items():
            if not _valid_record(info):
                raise FormatError(
                    f"{base}: quantized tensor {name!r} has no valid record",
                    "the file is corrupted or was edited; write it again",
                )
            for role in info["roles"]:
                key = f"{name}.{role}"
                if key not in self._r.entries:
                    raise FormatError(
                        f"{base}: quantized tensor {name!r} lacks its {role!r} data ({key!r})",
                        "the file is incomplete; write it again",
                    )
                pieces.add(key)
        return pieces

    def _check_guards(self, base: str) -> set[str]:
        """The quantized tensors' guards (an empty tensor under the quantized name itself)."""
        guards = {n for n in self._quant if n in self._r.entries}
        for name in guards:
            if self._version < 2 or self._r.nbytes(name) != 0:
                raise FormatError(
                    f"{base}: {name!r} is stored both quantized and as a plain tensor",
                    "the file is corrupted or was edited; write it again",
                )
        return guards

    @property
    def producers(self) -> dict[str, dict[str, str]]:
        return self._producers

    @property
    def format_version(self) -> int:
        return self._version

    @property
    def quantized_file(self) -> bool:
        return self._mq

    def tensor_names(self) -> list[str]:
        skip = self._pieces | self._guards
        return [k for k in self._r.keys() if k not in skip]  # noqa: SIM118

    def stored_names(self) -> set[str]:
        return set(self._r.entries)

    def qtensor_names(self) -> list[str]:
        return sorted(
            self._quant,
            key=lambda n: (
                self._r.entries[f"{n}.qdata"]["start"] if f"{n}.qdata" in self._r.entries else 0
            ),
        )

    def source(self, name: str) -> TensorSource:
        r = self._r
        return TensorSource(
            name,
            r.dtype(name),
            r.shape(name),
            r.nbytes(name),
            functools.partial(r.get, name),
            functools.partial(r.copy_to, name),
        )

    def qinfo(self, name: str) -> dict[str, Any]:
        info = dict(self._quant[name])
        info["nbytes"] = sum(self._r.nbytes(f"{name}.{role}") for role in info["roles"])
        return info

    def qtensor(self, name: str) -> QTensor:
        base = os.path.basename(self.path)
        info = self._quant[name]
        try:
            parts = {role: self._r.get(f"{name}.{role}") for role in info["roles"]}
            qt = QTensor(
                qdata=parts.pop("qdata"),
                scale=parts.pop("scale"),
                zero_point=parts.pop("zero_point", None),
                bits=int(info["bits"]),
                group_size=None if info["group_size"] is None else int(info["group_size"]),
                axis=None if info["axis"] is None else int(info["axis"]),
                shape=tuple(int(s) for s in info["shape"]),
                dtype=_DTYPES[info["dtype"]],
                scheme=str(info["scheme"]),
                extra=parts,
                meta={k: v for k, v in info.items() if k not in _STRUCT},
            )
            if bool(info["symmetric"]) != qt.symmetric:
                raise ValueError("'symmetric' disagrees with the presence of a zero point")
            qt.validate()
            qt.validate_values()  # NaN/Inf, zero/negative or integer scales: never garbage
        except FormatError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise FormatError(
                f"{base}: quantized tensor {name!r} is inconsistent ({type(e).__name__}: {e})",
                "the file is corrupted or was edited; write it again",
            ) from None
        return qt

    def close(self) -> None:
        self._r.close()


def _valid_record(info: Any) -> bool:
    """Structural check of one ``quantization`` entry (types only; values are checked when
    the tensor is read, by ``QTensor.validate``)."""

    def opt_int(v: Any, low: int) -> bool:
        return v is None or (type(v) is int and low <= v < 2**31)

    return (
        isinstance(info, dict)
        and isinstance(info.get("roles"), list)
        and all(isinstance(r, str) and r for r in info["roles"])
        and "qdata" in info["roles"]
        and "scale" in info["roles"]
        and isinstance(info.get("scheme"), str)
        and type(info.get("bits")) is int
        and opt_int(info.get("group_size"), 1)
        and opt_int(info.get("axis"), 0)
        and isinstance(info.get("shape"), list)
        and all(type(s) is int and 0 <= s < 2**63 for s in info["shape"])
        and info.get("dtype") in _DTYPES
        and isinstance(info.get("symmetric"), bool)
    )


def _producers(base: str, value: dict[str, Any]) -> dict[str, dict[str, str]]:
    """``plugin -> {"distribution": str, "version": str}``; anything else is a FormatError."""
    for plugin, info in value.items():
        if not isinstance(info, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in info.items()
        ):
            raise FormatError(
                f"{base}: metadata 'producers' entry {plugin!r} is not an object of strings "
                f"({json.dumps(info)[:80]})",
                "the file is corrupted or was edited; write it again",
            )
    return value


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
    except (json.JSONDecodeError, RecursionError) as e:
        raise FormatError(
            f"{base}: metadata {key!r} is not valid JSON ({e})", "write it again"
        ) from None
    if not isinstance(value, dict):
        raise FormatError(f"{base}: metadata {key!r} is not a JSON object", "write it again")
    return value


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "safetensors"


@hookimpl
def monoquant_register_serializers(register):
    register(SafetensorsSerializer())


__all__ = ["MonoQuantReader", "MonoQuantWriter", "SafetensorsSerializer", "write_safetensors"]
