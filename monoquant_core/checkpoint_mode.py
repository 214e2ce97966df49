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

import os
import sys
import time

import torch

from .checkpoint_tensors import Share, cost_of, quantize_share, read_ahead, settings_of
from .components import Serializer
from .distributed import Group, assign, current_group
from .errors import MonoQuantError
from .files import producers, serializer_for_write
from .journal import Journal, Record
from .plan import Plan
from .report import QuantReport
from .run import Run
from .selection import require_selected
from .sources import CheckpointSource, open_source
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
        share = Share(run, journal, {e.name: e for e in plan}, allow_nonfinite, out_format)
        report = _work(share, group, source, dst, plan, overwrite, progress, serializer,
                       resume, t0, notes)  # fmt: skip
    finally:
        if started:
            started[0].close()  # the lock; the journal itself stays after a failure
    return group.broadcast(report)


def _work(
    share: Share,
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
    owner = assign([cost_of(run, entries[n], s) for _, s, n in items], group.world)
    mine = [it for it, r in zip(items, owner, strict=True) if r == group.rank]
    share.settings = {n: settings_of(run, entries[n]) for _, _, n in items}
    # ranks on this machine (torchrun says so; --workers ranks are all local)
    local = int(os.environ.get("LOCAL_WORLD_SIZE", group.world)) if group.world > 1 else 1
    share.read_ahead = read_ahead(local, torch.get_num_threads())
    share.earlier = journal.records() if resume else {}
    try:
        t_start = time.perf_counter()
        done, counts = group.step(
            "quantizing", lambda: quantize_share(share, mine, progress and group.is_root)
        )
        busy = group.gather(counts.pop("busy_s"))  # each rank's own seconds on its share
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
        report.extra["phase_s"] = {
            "start": t_start - t0,
            "quantize": t_quantized - t_start,
            "write": now - t_quantized,
            "ranks": busy,
        }
    return report


def _stage(
    share: Share, source: CheckpointSource, plan: Plan, finished: dict[str, Record], group: Group
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
            share.run, shard, tmp, share.journal, finished, selected, share.out_format, prod,
            None, source.transformers,
        )  # fmt: skip
        os.replace(tmp, path)
    return out


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
