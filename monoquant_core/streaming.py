"""Checkpoint mode: quantize (or dequantize) a checkpoint file or folder, tensor by tensor.

Memory is bounded by the largest tensor that is quantized (plus a constant): each shard is
read through its serializer's streaming reader, selected tensors are loaded one at a time and
go through the same per-tensor code path as module mode (:meth:`Engine.quantize_weight`), and
every other tensor is copied byte for byte without being loaded. The output mirrors the input
(same shard files, a consistent index JSON, other files copied) and appears only when complete:
a single file is written to a temporary path and renamed; a folder is built in a temporary
sibling folder and renamed into place.

Hooks: ``monoquant_configure``, ``monoquant_modify_plan`` (with ``model=None``),
``monoquant_report`` and ``monoquant_unconfigure`` run as in module mode; there are no modules,
so ``monoquant_quantize_module`` and ``monoquant_module_done`` are not called.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .artifacts import ArtifactReader, ArtifactWriter
from .checkpoint import atomic_write, dequantize_qtensor, producers
from .config import Config
from .errors import UsageError
from .plan import Plan, PlanEntry
from .progress import Progress
from .report import QuantReport, layer_report
from .selection import build_tensor_plan
from .sources import CheckpointSource, Shard, open_source

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine

__all__ = ["dequantize_checkpoint", "plan_checkpoint", "quantize_checkpoint"]

ShardWriter = Callable[[Shard, str], tuple[list[str], int]]  # -> (stored names, tensor bytes)


def _tensor_list(source: CheckpointSource) -> list[tuple[str, tuple[int, ...], torch.dtype]]:
    out = []
    for shard in source.shards:
        for name in shard.reader.qtensor_names():
            raise UsageError(
                f"{os.path.basename(shard.path)} is already quantized ({name!r} is a "
                f"{shard.reader.qinfo(name)['scheme']} tensor)",
                "quantize the original float checkpoint (or `monoquant dequantize` this one)",
            )
        for name in shard.reader.tensor_names():
            src = shard.reader.source(name)
            out.append((name, src.shape, src.dtype))
    return out


def _plan(engine: Engine, source: CheckpointSource, config: Config) -> Plan:
    plan = build_tensor_plan(engine, _tensor_list(source), config)
    engine._call_plugin_hook("monoquant_modify_plan", plan=plan, model=None, config=config)
    for entry in plan.selected:
        engine.schemes.get(entry.scheme)
        engine.observers.get(entry.observer)
    return plan


def plan_checkpoint(engine: Engine, src: str, config: Config, trust_pickle: bool = False) -> Plan:
    """The checkpoint-mode plan for ``src`` (headers only; nothing is loaded)."""
    source = open_source(engine, src, trust_pickle)
    engine.pm.hook.monoquant_configure.call_historic(kwargs={"config": config})
    try:
        return _plan(engine, source, config)
    finally:
        engine.pm.hook.monoquant_unconfigure(config=config)
        source.close()


def check_paths(source: CheckpointSource, dst: str, overwrite: bool) -> str:
    """Refuse outputs that would clobber the input or an existing output; returns abs dst."""
    src = os.path.realpath(source.path)
    dst = os.path.abspath(os.fspath(dst))
    real = os.path.realpath(dst)
    if real == src:
        raise UsageError(f"the output {dst!r} is the input", "write to another path")
    if source.kind == "folder" and (real.startswith(src + os.sep) or src.startswith(real + os.sep)):
        raise UsageError(
            f"the output {dst!r} and the input folder contain one another",
            "write the output next to the input, not inside it (or around it)",
        )
    if source.kind != "folder" and src.startswith(real + os.sep):
        raise UsageError(f"the output {dst!r} contains the input", "write to another path")
    if not os.path.isdir(os.path.dirname(dst)):
        raise UsageError(
            f"output directory {os.path.dirname(dst)!r} does not exist",
            f"create it first (mkdir -p {os.path.dirname(dst)})",
        )
    if os.path.exists(dst):
        if not overwrite:
            raise UsageError(
                f"output {dst!r} already exists", "pass --overwrite or choose another path"
            )
        if (source.kind == "folder") != os.path.isdir(dst):
            kind = "folder" if os.path.isdir(dst) else "file"
            raise UsageError(
                f"output {dst!r} is an existing {kind}", "remove it or choose another path"
            )
    return dst


def _write_output(
    source: CheckpointSource,
    dst: str,
    overwrite: bool,
    write_shard: ShardWriter,
    before_commit: Callable[[int], None] | None = None,
) -> int:
    """Write every shard (+ index, + copied files) and move the result into place atomically.

    ``before_commit(total_bytes)`` runs when everything is written but not yet renamed into
    place; if it raises, nothing is committed.
    """
    if source.kind != "folder":
        sizes: list[int] = []

        def one(tmp: str) -> None:
            sizes.append(write_shard(source.shards[0], tmp)[1])
            if before_commit is not None:
                before_commit(sum(sizes))

        atomic_write(dst, one, overwrite)
        return sum(sizes)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.tmp-", dir=os.path.dirname(dst))
    try:
        weight_map: dict[str, str] = {}
        total = 0
        for shard in source.shards:
            names, nbytes = write_shard(shard, os.path.join(tmp, shard.out_name))
            weight_map.update((name, shard.out_name) for name in names)
            total += nbytes
        if source.index is not None:
            index = dict(source.index)
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": total}
            index["weight_map"] = dict(sorted(weight_map.items()))
            with open(os.path.join(tmp, source.index_name), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        for rel in source.copy:
            src = os.path.join(source.path, rel)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, rel))
        if before_commit is not None:
            before_commit(total)
        _replace_folder(tmp, dst, overwrite)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise UsageError(
            f"cannot write {dst!r}: {e.strerror or e}",
            "check free disk space and write permission of the output directory",
        ) from e
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return total


def _replace_folder(tmp: str, dst: str, overwrite: bool) -> None:
    if not os.path.exists(dst):
        os.rename(tmp, dst)
        return
    if not overwrite:
        raise UsageError(f"output {dst!r} already exists", "pass --overwrite")
    old = tempfile.mkdtemp(prefix=f".{os.path.basename(dst)}.old-", dir=os.path.dirname(dst))
    os.rmdir(old)
    os.rename(dst, old)
    try:
        os.rename(tmp, dst)
    except BaseException:
        os.rename(old, dst)
        raise
    shutil.rmtree(old, ignore_errors=True)


def _finite(t: torch.Tensor) -> bool:
    return t.numel() == 0 or bool(torch.isfinite(torch.stack([t.amin(), t.amax()])).all())


def quantize_checkpoint(
    engine: Engine,
    src: str,
    dst: str,
    config: Config,
    *,
    overwrite: bool = False,
    trust_pickle: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
) -> QuantReport:
    """See :meth:`Engine.quantize_checkpoint`."""
    t0 = time.perf_counter()
    source = open_source(engine, src, trust_pickle)
    try:
        dst = check_paths(source, dst, overwrite)
        engine.config = config
        engine.pm.hook.monoquant_configure.call_historic(kwargs={"config": config})
        try:
            plan = _plan(engine, source, config)
            report = QuantReport(config=config.to_dict())
            report.skipped = [(e.name, e.skip_reason or "") for e in plan.skipped]
            if source.not_copied:
                report.extra["not_copied"] = source.not_copied
            entries = {e.name: e for e in plan}
            sizes = [(s, n) for s in source.shards for n in s.reader.tensor_names()]
            prog = Progress(
                len(sizes), sum(s.reader.source(n).nbytes for s, n in sizes), enabled=progress
            )
            used = [engine.schemes.entry(e.scheme).plugin for e in plan.selected]
            prod = producers(engine, used)

            def write_shard(shard: Shard, path: str) -> tuple[list[str], int]:
                return _quantize_shard(
                    engine, shard, path, entries, report, prog, prod, config, allow_nonfinite
                )

            def before_commit(total: int) -> None:  # the report hook runs before the rename
                prog.close()
                report.model_bytes_after = total
                report.model_bytes_before = prog.bytes
                report.time_s = time.perf_counter() - t0
                engine._call_plugin_hook("monoquant_report", report=report, config=config)

            try:
                _write_output(source, dst, overwrite, write_shard, before_commit)
            finally:
                prog.close()
            return report
        finally:
            engine.config = None
            engine.pm.hook.monoquant_unconfigure(config=config)
    finally:
        source.close()


def _quantize_shard(
    engine: Engine,
    shard: Shard,
    path: str,
    entries: dict[str, PlanEntry],
    report: QuantReport,
    prog: Progress,
    prod: dict[str, dict[str, str]],
    config: Config,
    allow_nonfinite: bool,
) -> tuple[list[str], int]:
    writer = _writer(engine, path)
    stored: list[str] = []
    try:
        for name in shard.reader.tensor_names():
            src = shard.reader.source(name)
            entry = entries[name]
            if entry.selected:
                t = src.load()
                if not _finite(t):
                    bad = int((~torch.isfinite(t)).sum())
                    if not allow_nonfinite:
                        raise UsageError(
                            f"tensor {name!r} contains {bad} NaN/Inf value(s); quantizing it "
                            "would hide a broken checkpoint",
                            "fix the checkpoint, exclude it with --skip, or pass "
                            "--allow-nonfinite to keep such tensors in float",
                        )
                    report.skipped.append((name, f"contains {bad} NaN/Inf value(s): kept in float"))
                    writer.add_tensor(name, t)
                else:
                    report.layers.append(_quantize_one(engine, entry, t, writer))
                del t
            else:
                writer.add_tensor(name, src)
            stored.extend(writer.stored_names(name))
            prog.advance(name, src.nbytes)
        total = writer.close(prod, config.to_dict())
    except BaseException:
        writer.abort()
        raise
    return stored, total


def _quantize_one(engine: Engine, entry: PlanEntry, t: torch.Tensor, writer: ArtifactWriter):
    t1 = time.perf_counter()
    scheme_cfg, obs_cfg = engine.component_configs(entry)
    qt = engine.quantize_weight(
        t, entry.scheme, entry.observer, 0, scheme_cfg, obs_cfg, name=entry.name
    )
    deq = engine.schemes.get(qt.scheme).dequantize(qt)
    layer = layer_report(entry.name, "tensor", entry.observer or "", "", t, qt, deq)
    del deq
    writer.add_qtensor(entry.name, qt)
    layer.time_s = time.perf_counter() - t1
    return layer


def _writer(engine: Engine, path: str) -> ArtifactWriter:
    ser = engine.serializers.get("safetensors") if "safetensors" in engine.serializers else None
    for reg in engine.serializers:
        if any(path.endswith(s) for s in reg.component.suffixes):
            ser = reg.component
    if ser is None:
        raise UsageError("no serializer is installed", "reinstall monoquant")
    return ser.open_writer(path)


def dequantize_checkpoint(
    engine: Engine, src: str, dst: str, *, overwrite: bool = False, progress: bool = True
) -> int:
    """Write a plain float safetensors copy of a quantized file or folder; returns bytes."""
    source = open_source(engine, src)
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

        def write_shard(shard: Shard, path: str) -> tuple[list[str], int]:
            return _dequantize_shard(engine, shard, path, prog)

        try:
            return _write_output(source, dst, overwrite, write_shard)
        finally:
            prog.close()
    finally:
        source.close()


def _dequantize_shard(
    engine: Engine, shard: Shard, path: str, prog: Progress
) -> tuple[list[str], int]:
    reader: ArtifactReader = shard.reader
    writer = _writer(engine, path)
    names: list[str] = []
    try:
        for name in reader.tensor_names():
            writer.add_tensor(name, reader.source(name))
            names.append(name)
            prog.advance(name, 1)
        for name in reader.qtensor_names():
            qt = reader.qtensor(name)
            writer.add_tensor(
                name, dequantize_qtensor(engine, shard.path, name, qt, reader.producers)
            )
            names.append(name)
            prog.advance(name, 1)
        total = writer.close({}, {})  # no producers: a plain float file
    except BaseException:
        writer.abort()
        raise
    return names, total
