"""A rank's share of a checkpoint run: read each tensor (the next one read ahead), reuse its
journal record when it still holds (``--resume``), else quantize it and record it in the
journal. The orchestration around it (phases, ranks, writing) is :mod:`checkpoint_mode`."""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, is_dataclass
from typing import Any

import torch

from .components import Serializer
from .errors import MonoQuantError, UsageError, WeightNotRepresentable
from .files import producers
from .journal import Journal, Record, checksum
from .metrics import all_finite, count_nonfinite
from .plan import PlanEntry
from .progress import Progress
from .report import layer_report
from .run import Run
from .sources import Shard

__all__ = ["Item", "Share", "cost_of", "quantize_share", "read_ahead", "settings_of"]

#: read the next selected tensor while quantizing this one (memory then holds at most two
#: selected tensors): ``1`` / ``0`` force it on / off (a measurement switch for
#: bench/checkpoint.py); by default :func:`read_ahead` decides
_PREFETCH: bool | None = {"1": True, "0": False}.get(
    os.environ.get("MONOQUANT_CHECKPOINT_PREFETCH", "")
)


def read_ahead(local_ranks: int, threads: int) -> bool:
    """Whether a rank reads its next tensor in a thread while it quantizes this one: always
    for one process, and for several ranks on this machine only where their torch threads
    leave a core free (``local_ranks x threads < usable cores``). Two one-thread ranks on two
    cores: 12.8 s against 13.5 s with it forced on, peak RSS per rank 261 against 389 MiB
    (``python bench/checkpoint.py --params 1e9 --threads 1 --workers 2``, one run): their
    reading threads only take the cores from the other rank's quantization; one process
    with one thread on two cores gains 1.3x from it in the same run."""
    if _PREFETCH is not None:
        return _PREFETCH
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cores = os.cpu_count() or 1
    return local_ranks <= 1 or local_ranks * max(1, threads) < cores


Item = tuple[int, Shard, str]  # (index of the tensor in the input, its shard, its name)


@dataclass
class Share:
    """What quantizing one rank's share needs besides the tensors."""

    run: Run
    journal: Journal
    entries: dict[str, PlanEntry]
    allow_nonfinite: bool
    out_format: Serializer
    settings: dict[str, dict[str, Any]] = field(default_factory=dict)
    earlier: dict[str, list[Record]] = field(default_factory=dict)
    #: read the next tensor in a thread while quantizing (:func:`read_ahead`)
    read_ahead: bool = True


def quantize_share(
    share: Share, mine: list[Item], progress: bool
) -> tuple[dict[str, Record], dict[str, Any]]:
    """This rank's share: the records it finished (name -> Record) and counts of reused /
    computed tensors (and why earlier records were not reused), with ``busy_s``: its time."""
    t0 = time.perf_counter()
    done: dict[str, Record] = {}
    counts: dict[str, Any] = {"reused": 0, "computed": 0, "settings": 0, "input": 0, "part": 0}
    prog = Progress(len(mine), sum(s.reader.source(n).nbytes for _, s, n in mine), enabled=progress)
    ahead: dict[str, Future[tuple[torch.Tensor, str]]] = {}
    with ThreadPoolExecutor(1, thread_name_prefix="monoquant-read") as pool:
        try:
            for k, (index, shard, name) in enumerate(mine):
                fut = ahead.pop(name, None)
                t, crc = fut.result() if fut is not None else _load(shard, name)
                if share.read_ahead and k + 1 < len(mine):
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
    counts["busy_s"] = time.perf_counter() - t0
    return done, counts


def _load(shard: Shard, name: str) -> tuple[torch.Tensor, str]:
    t = shard.reader.source(name).load()
    return t, checksum(t)


def _reusable(share: Share, name: str, crc: str, counts: dict[str, int]) -> Record | None:
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


def _one(share: Share, index: int, entry: PlanEntry, t: torch.Tensor, crc: str) -> Record:
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


def settings_of(run: Run, entry: PlanEntry) -> dict[str, Any]:
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


def cost_of(run: Run, entry: PlanEntry, shard: Shard) -> float:
    """Estimated work of one tensor: elements x its scheme's cost per element."""
    scheme = run.schemes.get(entry.scheme)
    scheme_cfg, _ = run.entry_configs(entry)
    numel = math.prod(shard.reader.source(entry.name).shape)
    return numel * float(scheme.cost_per_element(scheme_cfg))
