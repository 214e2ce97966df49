"""The checkpoint plan and the streamed output writer of checkpoint mode
(:mod:`monoquant_core.checkpoint_mode`), shared with :mod:`monoquant_core.rewriting`
(``dequantize``, ``export``).

:func:`checkpoint_plan` plans a checkpoint from its headers alone (nothing is loaded).
:func:`write_output` writes an output that mirrors the input (same shard files, a consistent
index JSON, other files copied, a transformers ``config.json`` marked with the output's
``quantization_config``) and makes it appear only when complete: a single file is written to
a temporary path and renamed; a folder is built in a temporary sibling folder and renamed into
place (:mod:`monoquant_core.atomic`). :func:`write_from_journal` feeds it the finished
tensors of a checkpoint run from the run's journal (:mod:`monoquant_core.journal`).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Callable
from typing import Any

import torch

from .atomic import atomic_folder, atomic_write, check_folder
from .errors import UsageError
from .files import producers, serializer_for_write
from .journal import Journal, Record, as_layer_report
from .plan import Plan
from .progress import Progress
from .report import QuantReport
from .run import Run
from .selection import require_selected
from .sources import CheckpointSource, Shard, hf_config, open_source
from .tensor_plan import build_tensor_plan, picked_tensors

__all__ = [
    "ShardResult",
    "check_paths",
    "checkpoint_plan",
    "mark_hf_config",
    "plan_checkpoint",
    "shard_from_journal",
    "shard_path",
    "staged_path",
    "write_from_journal",
    "write_output",
]

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


def checkpoint_plan(run: Run, source: CheckpointSource) -> Plan:
    """The plan of a checkpoint source: tensors by name, the plan hook with ``model=None``
    (during which ``run.read_tensor(name)`` loads one tensor, for plugins that plan from the
    weights' values)."""
    plan = build_tensor_plan(run, _tensor_list(source))
    where = {n: s.reader for s in source.shards for n in s.reader.tensor_names()}
    run.read_tensor = lambda name: where[name].source(name).load()
    try:
        run.call_each("monoquant_modify_plan", plan=plan, model=None)
    finally:
        run.read_tensor = None
    for entry in plan.selected:
        run.schemes.get(entry.scheme)
        run.observers.get(entry.observer)
    return plan


def plan_checkpoint(run: Run, src: str, trust_pickle: bool = False) -> Plan:
    """The checkpoint-mode plan for ``src`` (headers only; nothing is loaded)."""
    source = open_source(run.registries, src, trust_pickle)
    try:
        return checkpoint_plan(run, source)
    finally:
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
    check_folder(os.path.dirname(dst))  # exists and is writable (the journal goes there too)
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


def write_output(
    source: CheckpointSource,
    dst: str,
    overwrite: bool,
    write_shard: ShardWriter,
    before_commit: Callable[[int], None] | None = None,
    hf_config: Callable[[], dict[str, Any] | None] | None = None,
) -> int:
    """Write every shard (+ index, + copied files) and move the result into place atomically.

    ``before_commit(total_bytes)`` runs when everything is written but not yet renamed into
    place; if it raises, nothing is committed. ``hf_config()``: the ``quantization_config``
    of the output's transformers ``config.json`` (None: none; see :func:`mark_hf_config`).
    """
    sizes: list[int] = []
    if source.kind != "folder":

        def one(tmp: str) -> None:
            sizes.append(write_shard(source.shards[0], tmp)[1])
            if before_commit is not None:
                before_commit(sum(sizes))

        atomic_write(dst, one, overwrite)
        return sum(sizes)

    def build(tmp: str) -> None:
        weight_map: dict[str, str] = {}
        for shard in source.shards:
            names, nbytes = write_shard(shard, os.path.join(tmp, shard.out_name))
            weight_map.update((name, shard.out_name) for name in names)
            sizes.append(nbytes)
        if source.index is not None:
            index = dict(source.index)
            index["metadata"] = {**(index.get("metadata") or {}), "total_size": sum(sizes)}
            index["weight_map"] = dict(sorted(weight_map.items()))
            with open(os.path.join(tmp, source.index_name), "w", encoding="utf-8") as f:
                json.dump(index, f, indent=2)
        for rel in source.copy:
            src = os.path.join(source.path, rel)
            (shutil.copytree if os.path.isdir(src) else shutil.copy2)(src, os.path.join(tmp, rel))
            if rel == "config.json":
                mark_hf_config(os.path.join(tmp, rel), hf_config() if hf_config else None)
        if before_commit is not None:
            before_commit(sum(sizes))

    atomic_folder(dst, build, overwrite)
    return sum(sizes)


def mark_hf_config(path: str, quantization_config: dict[str, Any] | None) -> bool:
    """Set ``quantization_config`` (the output serializer's
    :meth:`~monoquant_core.Serializer.hf_quantization_config`) in a copied Hugging Face
    ``config.json`` (a JSON object with ``model_type`` or ``architectures``), so transformers
    does not take the folder for a float model, or remove it (None: a float output, e.g.
    ``monoquant dequantize``); anything else is left as it is. True when changed."""
    cfg = hf_config(path)
    if cfg is None:
        return False
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    elif cfg.pop("quantization_config", None) is None:
        return False
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return True


def shard_path(source: CheckpointSource, dst: str) -> str:
    """The path a serializer is picked by: the output file, or a shard's name in the folder."""
    if source.kind != "folder":
        return dst
    return os.path.join(dst, source.shards[0].out_name)


class ShardResult(dict):
    """What writing one output shard from the journal gives its writer's rank to hand to rank 0
    (plain data): ``names`` (stored names), ``nbytes`` (tensor bytes written), ``bytes_in``
    (input tensor bytes), ``layers`` (report lines as dicts), ``skipped`` ((name, reason) of
    tensors kept in float on their rank) and ``facts`` (name -> QTensor facts)."""


def shard_from_journal(
    run: Run,
    shard: Shard,
    path: str,
    journal: Journal,
    finished: dict[str, Record],
    selected: set[str],
    out_format: Any,
    prod: dict[str, dict[str, str]],
    prog: Progress | None = None,
    for_transformers: bool = False,
) -> ShardResult:
    """Write one output shard at ``path`` from the finished records (each part checked against
    its checksum as it is read): finished tensors from their parts, every other tensor copied
    byte for byte, through the output serializer's streaming writer (``for_transformers``: a
    shard of a transformers folder, :attr:`~monoquant_core.ArtifactWriter.for_transformers`)."""
    out = ShardResult(names=[], nbytes=0, bytes_in=0, layers=[], skipped=[], facts={})
    writer = out_format.open_writer(path)
    writer.for_transformers = for_transformers
    try:
        for name in shard.reader.tensor_names():
            src = shard.reader.source(name)
            rec = finished.get(name) if name in selected else None
            if rec is not None and rec.part:
                writer.add_qtensor(name, journal.load(rec))
                out["layers"].append(rec.layer)
                out["facts"][name] = rec.facts
            else:
                if rec is not None:  # kept in float on its rank
                    out["skipped"].append((name, rec.reason))
                writer.add_tensor(name, src)
            out["names"].extend(writer.stored_names(name))
            out["bytes_in"] += src.nbytes
            if prog is not None:
                prog.advance(name, src.nbytes)
        out["nbytes"] = writer.close(prod, run.config.to_dict())
    except BaseException:
        writer.abort()
        raise
    return out


def write_from_journal(
    run: Run,
    source: CheckpointSource,
    journal: Journal,
    dst: str,
    plan: Plan,
    finished: dict[str, Record],
    overwrite: bool,
    serializer: str | None,
    progress: bool,
    t0: float,
    notes: list[str],
    staged: dict[str, ShardResult] | None = None,
) -> QuantReport:
    """The output of a checkpoint run (rank 0) from its finished records: every shard through
    :func:`shard_from_journal` (or, for the shards in ``staged``, the file other ranks already
    wrote into the journal's ``shards/`` folder, renamed into place), then
    :func:`write_output`'s atomic commit. ``t0``: the run's start, for the report; ``notes``:
    the journal's one-line notes, kept in ``report.extra["journal"]``."""
    report = QuantReport(config=run.config.to_dict())
    report.skipped = [(e.name, e.skip_reason or "") for e in plan.skipped]
    if notes:
        report.extra["journal"] = notes
    if source.not_copied:
        report.extra["not_copied"] = source.not_copied
    staged = staged or {}
    entries = {e.name: e for e in plan}
    selected = {e.name for e in plan.selected}
    mine = [
        (s, n) for s in source.shards if s.out_name not in staged for n in s.reader.tensor_names()
    ]
    prog = Progress(
        len(mine), sum(s.reader.source(n).nbytes for s, n in mine), enabled=progress,
        label="written",
    )  # fmt: skip
    used = [run.schemes.entry(e.scheme).plugin for e in plan.selected]
    prod = producers(run.registries, used)
    facts: dict[str, dict[str, Any]] = {}
    out_format = serializer_for_write(run.serializers, shard_path(source, dst), serializer)
    bytes_in = [0]

    def write_shard(shard: Shard, path: str) -> tuple[list[str], int]:
        if shard.out_name in staged:
            res = staged[shard.out_name]
            os.replace(staged_path(journal, shard), path)
        else:
            res = shard_from_journal(
                run, shard, path, journal, finished, selected, out_format, prod, prog,
                source.transformers,
            )  # fmt: skip
        report.layers.extend(as_layer_report(d) for d in res["layers"])
        for name, reason in res["skipped"]:
            entries[name].skip(reason)
            report.skipped.append((name, reason))
        facts.update(res["facts"])
        bytes_in[0] += res["bytes_in"]
        return res["names"], res["nbytes"]

    def before_commit(total: int) -> None:  # the report hook runs before the rename
        prog.close()
        # every selected weight may have been refused (kept in float): nothing to write
        require_selected(plan, picked_tensors(run.config, plan), "checkpoint")
        report.model_bytes_after = total
        report.model_bytes_before = bytes_in[0]
        report.time_s = time.perf_counter() - t0
        run.call_each("monoquant_report", report=report)

    try:
        write_output(
            source, dst, overwrite, write_shard, before_commit,
            lambda: out_format.hf_quantization_config(facts),
        )  # fmt: skip
    finally:
        prog.close()
    return report


def staged_path(journal: Journal, shard: Shard) -> str:
    """Where a rank other than 0 writes an output shard before rank 0 moves it into place."""
    return os.path.join(journal.folder, "shards", shard.out_name)
