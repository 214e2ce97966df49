"""Rewriting a quantized file or folder shard by shard without quantizing again: into another
serializer's format (``monoquant export``) or into plain float tensors (``monoquant
dequantize``). Same shards, index and copied files as the input (checkpoint mode's writer,
:func:`monoquant_core.streaming.write_output`); a transformers ``config.json`` gets the output
format's ``quantization_config``, or loses it for a float output."""

from __future__ import annotations

from typing import Any

from .artifacts import ArtifactReader
from .components import Serializer
from .errors import UsageError
from .files import dequantize_qtensor, serializer_for_write
from .progress import Progress
from .registry import Registries
from .sources import Shard, open_source
from .streaming import check_paths, write_output

__all__ = ["dequantize_checkpoint", "export_checkpoint"]


def dequantize_checkpoint(
    registries: Registries, src: str, dst: str, *, overwrite: bool = False, progress: bool = True
) -> int:
    """Write a plain float safetensors copy of a quantized file or folder; returns bytes."""
    return _rewrite(registries, src, dst, None, overwrite, progress)["bytes"]


def export_checkpoint(
    registries: Registries,
    src: str,
    dst: str,
    serializer: str,
    *,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Rewrite a quantized file or folder in another serializer's format without quantizing
    again: every tensor (quantized or not) goes to ``serializer``'s writer as it was read;
    a transformers ``config.json`` gets that serializer's ``quantization_config``. Returns
    ``{"bytes": written, "quantized": count, "tensors": count}``."""
    out_format = registries.serializers.get(serializer)
    if out_format.needs_model:
        raise UsageError(
            f"the {serializer} format holds a model graph and needs the model",
            f"pass the model and an example input (monoquant export ... --format {serializer} "
            "--model PKG.MOD:FACTORY --example-input FILE)",
        )
    return _rewrite(registries, src, dst, out_format, overwrite, progress)


def _rewrite(
    registries: Registries,
    src: str,
    dst: str,
    out_format: Serializer | None,
    overwrite: bool,
    progress: bool,
) -> dict[str, Any]:
    """Copy a quantized file or folder shard by shard: into ``out_format`` with its QTensors
    as they are (export), or, with None, into the default format with every QTensor
    dequantized by its scheme (a plain float checkpoint, its transformers config unmarked)."""
    source = open_source(registries, src)
    try:
        dst = check_paths(source, dst, overwrite)
        if not any(s.reader.quantized_file for s in source.shards):
            raise UsageError(
                f"{src!r} is not a Mono Quant quantized checkpoint",
                "give the output of `monoquant quantize`",
            )
        total = sum(
            len(s.reader.tensor_names()) + len(s.reader.qtensor_names()) for s in source.shards
        )
        prog = Progress(total, total, enabled=progress)
        facts: dict[str, dict[str, Any]] = {}
        counts = {"quantized": 0, "tensors": 0}

        def write_shard(shard: Shard, path: str) -> tuple[list[str], int]:
            reader: ArtifactReader = shard.reader
            ser = out_format or serializer_for_write(registries.serializers, path)
            writer = ser.open_writer(path)
            writer.for_transformers = out_format is not None and source.transformers
            names: list[str] = []
            try:
                for name in reader.tensor_names():
                    writer.add_tensor(name, reader.source(name))
                    names.extend(writer.stored_names(name))
                    counts["tensors"] += 1
                    prog.advance(name, 1)
                for name in reader.qtensor_names():
                    qt = reader.qtensor(name)
                    if out_format is None:
                        writer.add_tensor(
                            name,
                            dequantize_qtensor(
                                registries.schemes, shard.path, name, qt, reader.producers
                            ),
                        )
                    else:
                        writer.add_qtensor(name, qt)
                        facts[name] = qt.facts()
                    names.extend(writer.stored_names(name))
                    counts["quantized"] += 1
                    prog.advance(name, 1)
                if out_format is None:
                    nbytes = writer.close({}, {})  # no producers: a plain float file
                else:
                    nbytes = writer.close(reader.producers, getattr(reader, "config", {}) or {})
            except BaseException:
                writer.abort()
                raise
            return names, nbytes

        hf = None if out_format is None else lambda: out_format.hf_quantization_config(facts)
        try:
            written = write_output(source, dst, overwrite, write_shard, None, hf)
        finally:
            prog.close()
        return {"bytes": written, **counts}
    finally:
        source.close()
