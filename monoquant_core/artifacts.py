"""A quantized model as data, and the streaming reader/writer contracts of serializers.

``Artifact`` holds everything in memory (module mode). Checkpoint mode streams instead: a
serializer's :meth:`~monoquant_core.components.Serializer.open_reader` gives an
:class:`ArtifactReader` that hands out one tensor at a time, and
:meth:`~monoquant_core.components.Serializer.open_writer` an :class:`ArtifactWriter` that takes
one at a time. The defaults here buffer through ``read`` / ``write``, so a serializer that only
implements those still works (without the memory bound).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, BinaryIO

import torch

from .qtensor import QTensor

if TYPE_CHECKING:  # pragma: no cover
    from .components import Serializer

__all__ = ["Artifact", "ArtifactReader", "ArtifactWriter", "TensorSource", "write_through"]


@dataclass
class Artifact:
    """A quantized model as data: plain tensors, QTensors and provenance.

    Attributes:
        tensors: unquantized tensors by state_dict name.
        qtensors: quantized weights by state_dict name (e.g. ``"fc.weight"``).
        producers: plugin name -> ``{"distribution": ..., "version": ...}``.
        config: the run's :meth:`Config.to_dict` (empty when unknown).
        format_version: on-disk format version.
    """

    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    qtensors: dict[str, QTensor] = field(default_factory=dict)
    producers: dict[str, dict[str, str]] = field(default_factory=dict)
    config: dict[str, Any] = field(default_factory=dict)
    format_version: int = 1


@dataclass
class TensorSource:
    """One plain tensor of a file, not loaded yet.

    Attributes:
        name: its name in the file.
        dtype, shape, nbytes: from the file's header.
        load: reads it into memory.
        copy_to: writes its raw little-endian bytes to a binary file in chunks (None when the
            reader cannot do that); writers of the same container use it to copy without
            loading.
    """

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]
    nbytes: int
    load: Callable[[], torch.Tensor]
    copy_to: Callable[[BinaryIO], None] | None = None


class ArtifactReader:
    """Lazy view of a saved file (default: reads the whole file with ``serializer.read``).

    ``concurrent_loads``: True when a :class:`TensorSource`'s ``load`` may run in a worker
    thread while the caller reads or copies other tensors of the same file (checkpoint mode
    then reads the next tensor while it quantizes this one).
    """

    concurrent_loads: bool = False

    def __init__(
        self, serializer: Serializer | None = None, path: str = "", artifact: Artifact | None = None
    ):
        self.path = path
        self.artifact = artifact if artifact is not None else serializer.read(path)

    @property
    def producers(self) -> dict[str, dict[str, str]]:
        return self.artifact.producers

    @property
    def format_version(self) -> int:
        return self.artifact.format_version

    @property
    def quantized_file(self) -> bool:
        """True for a Mono Quant file (even one without quantized tensors)."""
        return bool(self.artifact.producers)

    def tensor_names(self) -> list[str]:
        """Names of the plain (unquantized) tensors, in file order."""
        return list(self.artifact.tensors)

    def qtensor_names(self) -> list[str]:
        """Names of the quantized tensors."""
        return list(self.artifact.qtensors)

    def stored_names(self) -> set[str]:
        """Every name stored in the file (a QTensor's pieces are ``<name>.<role>``)."""
        out = set(self.artifact.tensors)
        for name, qt in self.artifact.qtensors.items():
            out.update(f"{name}.{role}" for role in qt.tensors())
        return out

    def source(self, name: str) -> TensorSource:
        t = self.artifact.tensors[name]
        return TensorSource(name, t.dtype, tuple(t.shape), t.numel() * t.element_size(), lambda: t)

    def qtensor(self, name: str) -> QTensor:
        return self.artifact.qtensors[name]

    def qinfo(self, name: str) -> dict[str, Any]:
        """Header-level facts of a quantized tensor (scheme, bits, shape, ..., nbytes)."""
        qt = self.artifact.qtensors[name]
        return {
            "scheme": qt.scheme,
            "bits": qt.bits,
            "group_size": qt.group_size,
            "axis": qt.axis,
            "shape": list(qt.shape),
            "dtype": str(qt.dtype),
            "nbytes": qt.nbytes,
            **qt.meta,
        }

    def close(self) -> None:
        return None

    def __enter__(self) -> ArtifactReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class ArtifactWriter:
    """Takes tensors one at a time (default: buffers them, then ``serializer.write``)."""

    #: Set by the caller before the first tensor when the file is (a shard of) the weights of
    #: a Hugging Face transformers folder whose ``config.json`` carries the serializer's
    #: :meth:`~monoquant_core.Serializer.hf_quantization_config`. A format that transformers
    #: cannot load without an integration being imported stores what makes transformers fail
    #: loudly without it, instead of loading random weights (the ``safetensors`` format: an
    #: empty guard tensor under each quantized weight's name, docs/formats.md).
    for_transformers: bool = False

    def __init__(self, serializer: Serializer, path: str):
        self.serializer = serializer
        self.path = path
        self.artifact = Artifact()

    def add_tensor(self, name: str, tensor: torch.Tensor | TensorSource) -> None:
        """Add a plain tensor, or copy one from a :class:`TensorSource`."""
        self.artifact.tensors[name] = tensor.load() if isinstance(tensor, TensorSource) else tensor

    def add_qtensor(self, name: str, qt: QTensor) -> None:
        self.artifact.qtensors[name] = qt

    def stored_names(self, name: str) -> list[str]:
        """The names under which ``name`` is stored (a QTensor becomes several entries)."""
        if name in self.artifact.qtensors:
            return [f"{name}.{role}" for role in self.artifact.qtensors[name].tensors()]
        return [name]

    def close(self, producers: dict[str, dict[str, str]], config: dict[str, Any]) -> int:
        """Write the file; returns the number of tensor bytes written."""
        self.artifact.producers, self.artifact.config = producers, config
        self.serializer.write(self.artifact, self.path)
        a = self.artifact
        return sum(t.numel() * t.element_size() for t in a.tensors.values()) + sum(
            q.nbytes for q in a.qtensors.values()
        )

    def abort(self) -> None:
        self.artifact = Artifact()


def write_through(writer: ArtifactWriter, artifact: Artifact) -> int:
    """Add every tensor of ``artifact`` to ``writer`` and close it (aborted on any error): the
    whole-file write of a streaming serializer. Returns the tensor bytes written."""
    try:
        for name, t in artifact.tensors.items():
            writer.add_tensor(name, t)
        for name, qt in artifact.qtensors.items():
            writer.add_qtensor(name, qt)
        return writer.close(artifact.producers, artifact.config)
    except BaseException:
        writer.abort()
        raise
