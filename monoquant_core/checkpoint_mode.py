"""Checkpoint mode: quantize a checkpoint file or folder tensor by tensor, on one process or
on the ranks of a ``torch.distributed`` run, resumable.

A run has two phases (docs/scale.md):

1. **Quantize.** The selected tensors are split between the ranks by estimated cost
   (:func:`~monoquant_core.distributed.assign`: elements x the scheme's
   :meth:`~monoquant_core.Scheme.cost_per_element`); a single process is one rank with all of
   them. Each rank reads its tensors one at a time (the next one is read and checksummed in a
   worker thread while this one is quantized), quantizes them through the same per-tensor code
   path as module mode (``run.quantize_weight``) and records each result in the output's
   journal (:mod:`monoquant_core.journal`): its part file, then one JSON line. With
   ``resume``, a tensor whose journal line still matches (same settings, same input bytes,
   intact part) is not recomputed.
2. **Write.** When every rank has succeeded, rank 0 checks every part and writes the output
   exactly as before: the input's shard layout, each shard through the output serializer's
   streaming writer, finished tensors from their parts, every other tensor copied byte for
   byte; a file is written to a temporary path and renamed, a folder built in a temporary
   sibling and renamed (:func:`~monoquant_core.streaming.write_output`). Then the journal
   is removed. The output does not depend on the number of ranks or on interruptions:
   byte-identical to an uninterrupted single-process run.

Any rank failing fails every rank with one line naming the rank and the tensor; nothing is
written and the journal is kept for ``--resume``. Memory per rank is bounded by its largest
tensors (two selected tensors at a time with the read-ahead).

Hooks: the run's ``monoquant_configure`` / ``monoquant_unconfigure`` (by the host, on every
rank), ``monoquant_modify_plan`` (with ``model=None``; every rank computes the same plan) and
``monoquant_report`` (rank 0, before the output is committed) run as in module mode; there are
no modules, so ``monoquant_quantize_weights`` and ``monoquant_module_done`` are not called.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch

from .components import Serializer
from .distributed import Group, assign, current_group
from .errors import MonoQuantError, UsageError, WeightNotRepresentable
from .files import producers, serializer_for_write
from .journal import Journal, Record, checksum
from .metrics import all_finite, count_nonfinite
from .plan import Plan, PlanEntry
from .progress import Progress
from .report import QuantReport, layer_report
from .run import Run
from .selection import require_selected
from .sources import CheckpointSource, Shard, open_source
from .streaming import (
    ShardResult,
    check_paths,
    checkpoint_plan,
    shard_from_journal,
    shard_path,
    staged_path,
    write_from_journal,
)
from .tensor_plan import picked_tensors

__all__ = ["quantize_checkpoint"]

#: read the next selected tensor while quantizing this one (``0`` turns it off: a measurement
#: switch for bench/checkpoint.py; memory then holds at most two selected tensors)
_PREFETCH = os.environ.get("MONOQUANT_CHECKPOINT_PREFETCH", "1") != "0"

Item = tuple[int, Shard, str]  # (index of the tensor in the input, its shard, its name)


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
    resume: bool = False,
    distributed: bool | None = None,
) -> QuantReport:
    """See :meth:`monoquant_core.Engine.quantize_checkpoint`."""
    t0 = time.perf_counter()
    group = current_group() if distributed is not False else Group()
    try:
        source = group.step(
            "reading the input", lambda: open_source(run.registries, src, trust_pickle)
        )
        try:
            return _run(run, group, source, dst, overwrite, allow_nonfinite, progress,
                        serializer, resume, t0)  # fmt: skip
        finally:
            source.close()
    finally:
        group.close()


def _run(
    run: Run,
    group: Group,
    source: CheckpointSource,
    dst: str,
    overwrite: bool,
    allow_nonfinite: bool,
    progress: bool,
    serializer: str | None,
    resume: bool,
    t0: float,
) -> QuantReport:
    def check() -> tuple[str, Plan, Serializer]:
        out = check_paths(source, dst, overwrite)
        plan = checkpoint_plan(run, source)
        require_selected(plan, picked_tensors(run.config, plan), "checkpoint")
        fmt = serializer_for_write(run.serializers, shard_path(source, out), serializer)
        return out, plan, fmt

    dst, plan, out_format = group.step("checking the input and the output", check)
    started = group.step(
        "creating the journal",
        lambda: Journal.start(dst, resume, group.world) if group.is_root else None,
    )
    try:
        nonce = group.broadcast(started[1] if started else "")
        journal = group.step(
            "opening the journal",
            lambda: started[0] if started else Journal.attach(dst, group.rank, nonce),
        )
        notes = list(started[2]) if started else []
        _say(notes, progress)
        share = _Share(run, journal, {e.name: e for e in plan}, allow_nonfinite, out_format)
        report = _work(share, group, source, dst, plan, overwrite, progress, serializer,
                       resume, t0, notes)  # fmt: skip
    finally:
        if started:
            started[0].close()  # the lock; the journal itself stays after a failure
    return group.broadcast(report)


@dataclass
class _Share:
    """What quantizing one rank's share needs besides the tensors."""

    run: Run
    journal: Journal
    entries: dict[str, PlanEntry]
    allow_nonfinite: bool
    out_format: Serializer
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    earlier: dict[str, list[Record]] = field(default_factory=dict)


def _work(
    share: _Share,
    group: Group,
    source: CheckpointSource,
    dst: str,
    plan: Plan,
    overwrite: bool,
    progress: bool,
    serializer: str | None,
    resume: bool,
    t0: float,
    notes: list[str],
) -> QuantReport | None:
    """Both phases (quantize this rank's share; rank 0 writes the output); rank 0's report."""
    run, journal, entries = share.run, share.journal, share.entries
    items = [
        (i, shard, name)
        for i, (shard, name) in enumerate(
            (s, n) for s in source.shards for n in s.reader.tensor_names()
        )
        if entries[name].selected
    ]
    owner = assign([_cost(run, entries[n], s) for _, s, n in items], group.world)
    mine = [it for it, r in zip(items, owner, strict=True) if r == group.rank]
    share.settings = {n: _settings(run, entries[n]) for _, _, n in items}
    share.earlier = journal.records() if resume else {}
    try:
        done, counts = group.step(
            "quantizing", lambda: _quantize_mine(share, mine, progress and group.is_root)
        )
        finished: dict[str, Record] = {}
        for part in group.gather(done):
            finished.update(part)
        resumed = _resume_notes(resume, group.gather(counts))
        t_quantized = time.perf_counter()
        _say(resumed if group.is_root else [], progress)
        staged: dict[str, ShardResult] = {}
        if group.world > 1 and source.kind == "folder" and len(source.shards) > 1:
            mine_out = group.step(  # every rank writes its share of the output's shards
                "writing the output shards", lambda: _stage(share, source, plan, finished, group)
            )
            for part in group.gather(mine_out):
                staged.update(part)
        report = group.step(
            "writing the output",
            lambda: write_from_journal(run, source, journal, dst, plan, finished, overwrite,
                                       serializer, progress, t0, notes + resumed, staged)
            if group.is_root else None,
        )  # fmt: skip
    except BaseException as e:
        _after_failure(e, journal, group)
        raise
    if group.is_root:
        journal.remove()
        now = time.perf_counter()  # where the time went (bench/checkpoint.py prints it)
        report.extra["phase_s"] = {"quantize": t_quantized - t0, "write": now - t_quantized}
    return report


def _stage(
    share: _Share, source: CheckpointSource, plan: Plan, finished: dict[str, Record], group: Group
) -> dict[str, ShardResult]:
    """This rank's output shards (split by bytes, largest first to the least loaded rank),
    written into the journal's ``shards/`` folder for rank 0 to move into place."""
    sizes = [sum(s.reader.source(n).nbytes for n in s.reader.tensor_names()) for s in source.shards]
    owner = assign([float(b) for b in sizes], group.world)
    used = [share.run.schemes.entry(e.scheme).plugin for e in plan.selected]
    prod = producers(share.run.registries, used)
    selected = {e.name for e in plan.selected}
    out: dict[str, ShardResult] = {}
    for shard, rank in zip(source.shards, owner, strict=True):
        if rank != group.rank:
            continue
        path = staged_path(share.journal, shard)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = f"{path}.{os.getpid()}.tmp"
        out[shard.out_name] = shard_from_journal(
            share.run, shard, tmp, share.journal, finished, selected, share.out_format, prod
        )
        os.replace(tmp, path)
    return out


def _quantize_mine(
    share: _Share, mine: list[Item], progress: bool
) -> tuple[dict[str, Record], dict[str, int]]:
    """This rank's share: the records it finished (name -> Record) and counts of reused /
    computed tensors (and why earlier records were not reused)."""
    done: dict[str, Record] = {}
    counts = {"reused": 0, "computed": 0, "settings": 0, "input": 0, "part": 0}
    prog = Progress(len(mine), sum(s.reader.source(n).nbytes for _, s, n in mine), enabled=progress)
    ahead: dict[str, Future[tuple[torch.Tensor, str]]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="monoquant-read") as pool:
        try:
            for k, (index, shard, name) in enumerate(mine):
                fut = ahead.pop(name, None)
                t, crc = fut.result() if fut is not None else _load(shard, name)
                if _PREFETCH and k + 1 < len(mine):
                    _, nshard, nname = mine[k + 1]
                    if getattr(nshard.reader, "concurrent_loads", False):
                        ahead[nname] = pool.submit(_load, nshard, nname)
                rec = _reusable(share, name, crc, counts)
                if rec is None:
                    rec = _one(share, index, share.entries[name], t, crc)
                    counts["computed"] += 1
                else:
                    counts["reused"] += 1
                done[name] = rec
                del t
                prog.advance(name, shard.reader.source(name).nbytes)
        except BaseException:
            with contextlib.suppress(Exception):  # the parts already handed over still land
                share.journal.flush()
            raise
        finally:
            for f in ahead.values():
                f.cancel()
            prog.close()
    share.journal.flush()
    return done, counts


def _load(shard: Shard, name: str) -> tuple[torch.Tensor, str]:
    t = shard.reader.source(name).load()
    return t, checksum(t)


def _reusable(share: _Share, name: str, crc: str, counts: dict[str, int]) -> Record | None:
    """The newest earlier record of a tensor that still holds; counts why the others fail."""
    records, settings = share.earlier.get(name, []), share.settings[name]
    if not records:
        return None
    for rec in reversed(records):
        if rec.settings == settings and rec.input == crc and share.journal.part_ok(rec):
            # a tensor kept in float by --allow-nonfinite then is refused now without it
            return None if rec.nonfinite and not share.allow_nonfinite else rec
    last = records[-1]
    why = "settings" if last.settings != settings else "input" if last.input != crc else "part"
    counts[why] += 1
    return None


def _one(share: _Share, index: int, entry: PlanEntry, t: torch.Tensor, crc: str) -> Record:
    """Quantize one tensor and record it (or why it stays in float) in the journal."""
    run, journal, name, settings = share.run, share.journal, entry.name, share.settings[entry.name]
    if not all_finite(t):
        if not share.allow_nonfinite:
            raise UsageError(
                f"tensor {name!r} contains {count_nonfinite(t)} NaN/Inf value(s); "
                "quantizing it would hide a broken checkpoint",
                "fix the checkpoint, exclude it with --skip, or pass --allow-nonfinite to "
                "keep such tensors in float",
            )
        reason = f"contains {count_nonfinite(t)} NaN/Inf value(s): kept in float"
        return journal.add_float(name, crc, settings, reason, nonfinite=True)
    t1 = time.perf_counter()
    scheme_cfg, obs_cfg = run.entry_configs(entry)
    try:
        qt = run.quantize_weight(t, entry.scheme, entry.observer, 0, scheme_cfg, obs_cfg, name)
    except WeightNotRepresentable as e:  # as module mode: kept in float, with why
        return journal.add_float(name, crc, settings, f"kept in float: {e.problem}", False)
    except MonoQuantError as e:
        if name in e.problem:
            raise
        raise type(e)(f"tensor {name!r}: {e.problem}", e.fix) from e
    except Exception as e:  # a plugin's bug: kept as it is, with the tensor named
        if hasattr(e, "add_note"):  # Python >= 3.11
            e.add_note(f"while quantizing tensor {name!r}")
        raise
    why = share.out_format.unsupported(name, qt)
    if why is not None:  # found at the first such tensor, not after all the work
        raise UsageError(f"{name}: {why}", share.out_format.unsupported_fix)
    scheme = run.schemes.get(qt.scheme)
    layer = layer_report(
        name, "tensor", entry.observer or "", "", t, qt, scheme, stats=run.config.stats
    )
    layer.time_s = time.perf_counter() - t1
    return journal.add_quantized(index, name, crc, settings, qt, layer)


def _say(lines: list[str], enabled: bool) -> None:
    for line in lines if enabled else []:
        sys.stderr.write(f"monoquant: {line}\n")
    sys.stderr.flush()


def _after_failure(e: BaseException, journal: Journal, group: Group) -> None:
    """Keep the journal when it holds quantized tensors, and say so in the error; otherwise
    remove it, so a failed run leaves nothing behind."""
    if not any(r.part for recs in journal.records().values() for r in recs):
        if group.is_root:
            journal.remove()
    elif isinstance(e, MonoQuantError):
        kept = f"the finished tensors are kept in {journal.folder}: add --resume to reuse them"
        e.fix = f"{e.fix}; {kept}" if e.fix else kept


def _resume_notes(resume: bool, counts: list[dict[str, int]]) -> list[str]:
    if not resume:
        return []
    total = {k: sum(c.get(k, 0) for c in counts) for k in counts[0]} if counts else {}
    why = [
        f"{total[k]} {label}"
        for k, label in (
            ("settings", "whose settings changed"),
            ("input", "whose input changed"),
            ("part", "whose finished part was missing or damaged"),
        )
        if total.get(k)
    ]
    return [
        f"resumed: {total.get('reused', 0)} tensor(s) reused from the unfinished run, "
        f"{total.get('computed', 0)} computed" + (f" ({', '.join(why)})" if why else "")
    ]


def _settings(run: Run, entry: PlanEntry) -> dict[str, Any]:
    """Everything a tensor's result depends on besides its bytes, as plain JSON."""
    scheme_cfg, obs_cfg = run.entry_configs(entry)
    plugins = [run.schemes.entry(entry.scheme).plugin, run.observers.entry(entry.observer).plugin]
    raw = {
        "scheme": entry.scheme,
        "observer": entry.observer,
        "scheme_config": asdict(scheme_cfg) if is_dataclass(scheme_cfg) else scheme_cfg,
        "observer_config": asdict(obs_cfg) if is_dataclass(obs_cfg) else obs_cfg,
        "options": entry.options,
        "stats": run.config.stats,
        "plugins": producers(run.registries, plugins),
    }
    return json.loads(json.dumps(raw, sort_keys=True, default=str))


def _cost(run: Run, entry: PlanEntry, shard: Shard) -> float:
    """Estimated work of one tensor: elements x its scheme's cost per element."""
    scheme = run.schemes.get(entry.scheme)
    scheme_cfg, _ = run.entry_configs(entry)
    numel = math.prod(shard.reader.source(entry.name).shape)
    return numel * float(scheme.cost_per_element(scheme_cfg))
