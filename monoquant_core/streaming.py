"""Checkpoint mode: quantize a checkpoint file or folder, tensor by tensor, and the output
writer it shares with :mod:`monoquant_core.rewriting` (``dequantize``, ``export``).

Memory is bounded by the largest tensors that are quantized (the next one is read in a worker
thread while the current one is quantized): each shard is
read through its serializer's streaming reader, selected tensors are loaded one at a time and
go through the same per-tensor code path as module mode (``run.quantize_weight``), and every
other tensor is copied byte for byte without being loaded. The output mirrors the input (same
shard files, a consistent index JSON, other files copied) and appears only when complete: a
single file is written to a temporary path and renamed; a folder is built in a temporary
sibling folder and renamed into place (:mod:`monoquant_core.atomic`).

Hooks: the run's ``monoquant_configure`` / ``monoquant_unconfigure`` (by the host),
``monoquant_modify_plan`` (with ``model=None``) and ``monoquant_report`` run as in module
mode; there are no modules, so ``monoquant_quantize_weights`` and ``monoquant_module_done``
are not called.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .artifacts import ArtifactWriter
from .atomic import atomic_folder, atomic_write
from .errors import UsageError, WeightNotRepresentable
from .files import producers, serializer_for_write
from .metrics import all_finite, count_nonfinite
from .plan import Plan, PlanEntry
from .progress import Progress
from .report import LayerReport, QuantReport, layer_report
from .run import Run
from .selection import require_selected
from .sources import CheckpointSource, Shard, open_source
from .tensor_plan import build_tensor_plan, picked_tensors

__all__ = [
    "check_paths",
    "mark_hf_config",
    "plan_checkpoint",
    "quantize_checkpoint",
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


def _plan(run: Run, source: CheckpointSource) -> Plan:
    plan = build_tensor_plan(run, _tensor_list(source))
    run.call_each("monoquant_modify_plan", plan=plan, model=None)
    for entry in plan.selected:
        run.schemes.get(entry.scheme)
        run.observers.get(entry.observer)
    return plan


def plan_checkpoint(run: Run, src: str, trust_pickle: bool = False) -> Plan:
    """The checkpoint-mode plan for ``src`` (headers only; nothing is loaded)."""
    source = open_source(run.registries, src, trust_pickle)
    try:
        return _plan(run, source)
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
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError):
        return False
    if not isinstance(cfg, dict) or not ("model_type" in cfg or "architectures" in cfg):
        return False
    if quantization_config is not None:
        cfg["quantization_config"] = quantization_config
    elif cfg.pop("quantization_config", None) is None:
        return False
    with open(path, "w", encoding="utf-8") as f:
        json.dump(cfg, f, indent=2)
        f.write("\n")
    return True


def quantize_checkpoint(
    run: Run,
    src: str,
    dst: str,
    *,
    overwrite: bool = False,
    trust_pickle: bool = False,
    allow_nonfinite: bool = False,
    progress: bool = True,
    serializer: str | None = None,
) -> QuantReport:
    """See :meth:`monoquant_core.Engine.quantize_checkpoint`."""
    t0 = time.perf_counter()
    source = open_source(run.registries, src, trust_pickle)
    try:
        dst = check_paths(source, dst, overwrite)
        plan = _plan(run, source)
        require_selected(plan, picked_tensors(run.config, plan), "checkpoint")
        report = QuantReport(config=run.config.to_dict())
        report.skipped = [(e.name, e.skip_reason or "") for e in plan.skipped]
        if source.not_copied:
            report.extra["not_copied"] = source.not_copied
        entries = {e.name: e for e in plan}
        sizes = [(s, n) for s in source.shards for n in s.reader.tensor_names()]
        prog = Progress(
            len(sizes), sum(s.reader.source(n).nbytes for s, n in sizes), enabled=progress
        )
        used = [run.schemes.entry(e.scheme).plugin for e in plan.selected]
        prod = producers(run.registries, used)
        facts: dict[str, dict[str, Any]] = {}
        out_format = serializer_for_write(run.serializers, _shard_path(source, dst), serializer)

        def write_shard(shard: Shard, path: str) -> tuple[list[str], int]:
            writer = out_format.open_writer(path)
            try:
                stored = _quantize_shard(
                    run, shard, writer, entries, report, prog, allow_nonfinite, facts
                )
                total = writer.close(prod, run.config.to_dict())
            except BaseException:
                writer.abort()
                raise
            return stored, total

        def before_commit(total: int) -> None:  # the report hook runs before the rename
            prog.close()
            # every selected weight may have been refused (kept in float): nothing to write
            require_selected(plan, picked_tensors(run.config, plan), "checkpoint")
            report.model_bytes_after = total
            report.model_bytes_before = prog.bytes
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
    finally:
        source.close()


def _quantize_shard(
    run: Run,
    shard: Shard,
    writer: ArtifactWriter,
    entries: dict[str, PlanEntry],
    report: QuantReport,
    prog: Progress,
    allow_nonfinite: bool,
    facts: dict[str, dict[str, Any]],
) -> list[str]:
    stored: list[str] = []
    names = shard.reader.tensor_names()
    selected = [n for n in names if entries[n].selected]
    following = dict(itertools.pairwise(selected))
    ahead: dict[str, Future[torch.Tensor]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="monoquant-read") as pool:
        try:
            for name in names:
                _one_tensor(
                    run, shard, writer, entries, report, allow_nonfinite, facts, name,
                    ahead, following, pool,
                )  # fmt: skip
                stored.extend(writer.stored_names(name))
                prog.advance(name, shard.reader.source(name).nbytes)
        finally:
            for fut in ahead.values():
                fut.cancel()
    return stored


#: read the next selected tensor while quantizing this one (``0`` turns it off: a measurement
#: switch for bench/checkpoint.py; memory then holds at most two selected tensors)
_PREFETCH = os.environ.get("MONOQUANT_CHECKPOINT_PREFETCH", "1") != "0"


def _one_tensor(
    run: Run,
    shard: Shard,
    writer: ArtifactWriter,
    entries: dict[str, PlanEntry],
    report: QuantReport,
    allow_nonfinite: bool,
    facts: dict[str, dict[str, Any]],
    name: str,
    ahead: dict[str, Future[torch.Tensor]],
    following: dict[str, str],
    pool: ThreadPoolExecutor,
) -> None:
    src = shard.reader.source(name)
    entry = entries[name]
    if not entry.selected:
        writer.add_tensor(name, src)
        return
    fut = ahead.pop(name, None)
    t = fut.result() if fut is not None else src.load()
    nxt = following.get(name)
    if _PREFETCH and nxt is not None and getattr(shard.reader, "concurrent_loads", False):
        ahead[nxt] = pool.submit(shard.reader.source(nxt).load)
    if all_finite(t):
        try:
            report.layers.append(_quantize_one(run, entry, t, writer, facts))
        except WeightNotRepresentable as e:  # as module mode: kept in float, with why
            entry.skip(f"kept in float: {e.problem}")
            report.skipped.append((name, entry.skip_reason))
            writer.add_tensor(name, t)
    elif allow_nonfinite:
        bad = count_nonfinite(t)
        report.skipped.append((name, f"contains {bad} NaN/Inf value(s): kept in float"))
        writer.add_tensor(name, t)
    else:
        raise UsageError(
            f"tensor {name!r} contains {count_nonfinite(t)} NaN/Inf value(s); "
            "quantizing it would hide a broken checkpoint",
            "fix the checkpoint, exclude it with --skip, or pass --allow-nonfinite to "
            "keep such tensors in float",
        )
    del t


def _quantize_one(
    run: Run,
    entry: PlanEntry,
    t: torch.Tensor,
    writer: ArtifactWriter,
    facts: dict[str, dict[str, Any]],
) -> LayerReport:
    t1 = time.perf_counter()
    scheme_cfg, obs_cfg = run.entry_configs(entry)
    qt = run.quantize_weight(t, entry.scheme, entry.observer, 0, scheme_cfg, obs_cfg, entry.name)
    scheme = run.schemes.get(qt.scheme)
    obs = entry.observer or ""
    layer = layer_report(entry.name, "tensor", obs, "", t, qt, scheme, stats=run.config.stats)
    writer.add_qtensor(entry.name, qt)
    facts[entry.name] = qt.facts()
    layer.time_s = time.perf_counter() - t1
    return layer


def _shard_path(source: CheckpointSource, dst: str) -> str:
    """The path a serializer is picked by: the output file, or a shard's name in the folder."""
    if source.kind != "folder":
        return dst
    return os.path.join(dst, source.shards[0].out_name)
