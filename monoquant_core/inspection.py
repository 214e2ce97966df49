"""``inspect`` (what a file holds) and ``verify`` (how close a quantized file is to its original).

Both read files or sharded folders through the serializers' streaming readers: ``inspect``
reads headers only; ``verify`` loads one original tensor and its counterpart at a time.
"""

from __future__ import annotations

import math
import os
from typing import Any

import torch

from .errors import UsageError
from .files import dequantize_qtensor
from .metrics import all_finite, count_nonfinite, sqnr_db
from .progress import Progress
from .registry import Registries
from .sources import open_source
from .tables import format_table, human_bytes

__all__ = [
    "inspect_path",
    "render_inspect",
    "render_verify",
    "verify_error",
    "verify_failed",
    "verify_paths",
]


def inspect_path(registries: Registries, path: str) -> dict[str, Any]:
    """Per-tensor facts of a file or folder, from headers (nothing is loaded)."""
    source = open_source(registries, path)
    try:
        tensors: list[dict[str, Any]] = []
        producers: dict[str, Any] = {}
        versions = set()
        quantized_file = False
        for shard in source.shards:
            r = shard.reader
            quantized_file |= r.quantized_file
            if r.quantized_file:
                versions.add(r.format_version)
                producers.update(r.producers)
            for name in r.qtensor_names():
                info = r.qinfo(name)
                numel = math.prod(info["shape"])
                tensors.append(
                    {
                        "name": name,
                        "shard": shard.out_name,
                        "quantized": True,
                        "scheme": info["scheme"],
                        "bits": info["bits"],
                        "group_size": info["group_size"],
                        "shape": list(info["shape"]),
                        "dtype": info["dtype"],
                        "nbytes": info["nbytes"],
                        "bits_per_weight": 8 * info["nbytes"] / numel if numel else 0.0,
                    }
                )
            for name in r.tensor_names():
                s = r.source(name)
                numel = math.prod(s.shape)
                tensors.append(
                    {
                        "name": name,
                        "shard": shard.out_name,
                        "quantized": False,
                        "scheme": None,
                        "bits": None,
                        "group_size": None,
                        "shape": list(s.shape),
                        "dtype": str(s.dtype).replace("torch.", ""),
                        "nbytes": s.nbytes,
                        "bits_per_weight": 8 * s.nbytes / numel if numel else 0.0,
                    }
                )
    finally:
        source.close()
    q = [t for t in tensors if t["quantized"]]
    qparams = sum(math.prod(t["shape"]) for t in q)
    qbytes = sum(t["nbytes"] for t in q)
    return {
        "path": os.path.abspath(path),
        "format": "monoquant" if quantized_file else "safetensors (plain)",
        "format_version": max(versions) if versions else None,
        "producers": producers,
        "shards": [s.out_name for s in source.shards],
        "tensors": tensors,
        "totals": {
            "tensors": len(tensors),
            "quantized": len(q),
            "bytes": sum(t["nbytes"] for t in tensors),
            "quantized_bits_per_weight": 8 * qbytes / qparams if qparams else None,
        },
    }


def _producer(name: str, v: Any) -> str:
    if not isinstance(v, dict):  # a reader that passed provenance through unchecked
        return f"{name} ({v!r:.40})"
    return f"{name} ({v.get('distribution') or '?'} {v.get('version') or ''})".strip()


def render_inspect(info: dict[str, Any]) -> str:
    prods = ", ".join(_producer(k, v) for k, v in info["producers"].items()) or "-"
    head = [
        f"{info['path']}: {info['format']}"
        + (f", format version {info['format_version']}" if info["format_version"] else ""),
        f"producers: {prods}",
        f"shards: {', '.join(info['shards'])}",
        "",
    ]
    rows = [
        [
            t["name"],
            t["scheme"] or "float",
            "x".join(map(str, t["shape"])),
            t["dtype"],
            f"{t['bits_per_weight']:.2f}",
            human_bytes(t["nbytes"]),
        ]
        for t in info["tensors"]
    ]
    tot = info["totals"]
    bpw = tot["quantized_bits_per_weight"]
    tail = [
        "",
        f"{tot['tensors']} tensors, {tot['quantized']} quantized, {human_bytes(tot['bytes'])}"
        + (f", {bpw:.2f} bits per quantized weight" if bpw else ""),
    ]
    body = format_table(["tensor", "scheme", "shape", "dtype", "bits/w", "size"], rows)
    return "\n".join([*head, body, *tail])


def verify_paths(
    registries: Registries, original: str, quantized: str, progress: bool = True
) -> dict[str, Any]:
    """Compare every tensor of ``original`` with ``quantized`` (re-read through the loader)."""
    orig = open_source(registries, original)
    try:
        quant = open_source(registries, quantized)
    except BaseException:
        orig.close()
        raise
    try:
        where: dict[str, Any] = {}
        for shard in quant.shards:
            for name in shard.reader.qtensor_names():
                where[name] = (shard, True)
            for name in shard.reader.tensor_names():
                where[name] = (shard, False)
        names = [(s, n) for s in orig.shards for n in s.reader.tensor_names()]
        if not names:
            raise UsageError(f"{original!r} holds no float tensors", "give the original checkpoint")
        if where and not any(n in where for _, n in names):
            raise UsageError(
                f"{quantized!r} does not correspond to {original!r}: none of its {len(where)} "
                f"tensors has the name of one of the original's {len(names)}",
                "give the original checkpoint and the output of quantizing it "
                "(monoquant verify ORIGINAL QUANTIZED)",
            )
        prog = Progress(
            len(names),
            sum(s.reader.source(n).nbytes for s, n in names),
            enabled=progress,
            label="tensors verified",
        )
        rows, missing, orig_bytes = [], [], 0
        for shard, name in names:
            src = shard.reader.source(name)
            orig_bytes += src.nbytes
            if name not in where:
                missing.append(name)
                prog.advance(name, src.nbytes)
                continue
            ref = src.load()
            qshard, is_q = where.pop(name)
            if is_q:
                qt = qshard.reader.qtensor(name)
                got = dequantize_qtensor(
                    registries.schemes, qshard.path, name, qt, qshard.reader.producers
                )
                scheme = qt.scheme
            else:
                got, scheme = qshard.reader.source(name).load(), None
            rows.append(_compare(name, scheme, ref, got))
            prog.advance(name, src.nbytes)
            del ref, got
        prog.close()
        quant_bytes = sum(
            sum(s.reader.qinfo(n)["nbytes"] for n in s.reader.qtensor_names())
            + sum(s.reader.source(n).nbytes for n in s.reader.tensor_names())
            for s in quant.shards
        )
    finally:
        orig.close()
        quant.close()
    qrows = [r for r in rows if r["scheme"]]
    return {
        "original": os.path.abspath(original),
        "quantized": os.path.abspath(quantized),
        "tensors": rows,
        "missing": missing,
        "extra": sorted(where),
        "original_bytes": orig_bytes,
        "quantized_bytes": quant_bytes,
        "compression_ratio": orig_bytes / quant_bytes if quant_bytes else 0.0,
        "min_sqnr_db": _min_sqnr(qrows),
        "mismatched_copies": [r["name"] for r in rows if not r["scheme"] and not r["exact"]],
    }


def _min_sqnr(rows: list[dict[str, Any]]) -> float | None:
    """The lowest SQNR; NaN (not comparable, so never "above" a threshold) wins."""
    values = [r["sqnr_db"] for r in rows]
    if any(math.isnan(v) for v in values):
        return math.nan
    return min(values, default=None)


def _compare(name: str, scheme: str | None, ref: torch.Tensor, got: torch.Tensor) -> dict[str, Any]:
    if tuple(ref.shape) != tuple(got.shape):
        return {
            "name": name,
            "scheme": scheme,
            "sqnr_db": -math.inf,
            "max_abs_err": math.inf,
            "exact": False,
            "note": f"shape {tuple(got.shape)} != {tuple(ref.shape)}",
        }
    exact = ref.dtype == got.dtype and torch.equal(_bits(ref), _bits(got))  # NaN == NaN here
    if exact:
        return {
            "name": name,
            "scheme": scheme,
            "sqnr_db": math.inf,
            "max_abs_err": 0.0,
            "exact": True,
            "note": "",
        }
    if ref.is_floating_point() and got.is_floating_point():
        bad_ref, bad_got = not all_finite(ref), not all_finite(got)
        if bad_ref or bad_got:  # no SQNR to speak of (and sqnr_db would divide by inf)
            which = "the quantized tensor" if bad_got else "the original"
            n = count_nonfinite(got if bad_got else ref)
            return {
                "name": name,
                "scheme": scheme,
                "sqnr_db": math.nan,
                "max_abs_err": math.nan,
                "exact": False,
                "note": f"{which} holds {n} NaN/Inf value(s)",
            }
    r, g = ref.to(torch.float32), got.to(torch.float32)
    err = (r - g).abs()
    return {
        "name": name,
        "scheme": scheme,
        "sqnr_db": sqnr_db(r, g),
        "max_abs_err": err.max().item() if err.numel() else 0.0,
        "exact": False,
        "note": "",
    }


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().reshape(-1).view(torch.uint8)


def render_verify(res: dict[str, Any], min_sqnr: float | None) -> str:
    def db(x: float) -> str:
        return "inf" if math.isinf(x) and x > 0 else "nan" if math.isnan(x) else f"{x:.2f}"

    rows = [
        [
            r["name"],
            r["scheme"] or "copied",
            db(r["sqnr_db"]),
            f"{r['max_abs_err']:.3g}",
            "FAIL" if _fails(r, min_sqnr) else "ok",
        ]
        for r in res["tensors"]
    ]
    out = [format_table(["tensor", "scheme", "SQNR dB", "max err", "check"], rows), ""]
    out += [f"missing from the quantized file: {n}" for n in res["missing"]]
    out += [f"not in the original: {n}" for n in res["extra"]]
    out += [f"{r['name']}: {r['note']}" for r in res["tensors"] if r["note"]]
    out += [f"copied tensor differs from the original: {n}" for n in res["mismatched_copies"]]
    m = res["min_sqnr_db"]
    out.append(
        f"{human_bytes(res['original_bytes'])} -> {human_bytes(res['quantized_bytes'])} "
        f"({res['compression_ratio']:.2f}x smaller), min SQNR {db(m) if m is not None else '-'} dB"
        + (f", threshold {min_sqnr:.2f} dB" if min_sqnr is not None else "")
    )
    return "\n".join(out)


def _fails(row: dict[str, Any], min_sqnr: float | None) -> bool:
    if row["note"] or (not row["scheme"] and not row["exact"]) or math.isnan(row["sqnr_db"]):
        return True
    return bool(row["scheme"] and min_sqnr is not None and not row["sqnr_db"] >= min_sqnr)


def verify_failed(res: dict[str, Any], min_sqnr: float | None) -> bool:
    """True when CI should fail: a tensor below the threshold or NaN/Inf, a tensor missing, an
    extra tensor the original does not have, a shape mismatch, or an altered copy."""
    return bool(
        res["missing"]
        or res["extra"]
        or res["mismatched_copies"]
        or any(_fails(r, min_sqnr) for r in res["tensors"])
    )


def verify_error(res: dict[str, Any], min_sqnr: float | None) -> UsageError | None:
    """The one-line error of a failed verification (None when it passed), with the fix that
    fits the failure: files that do not correspond, NaN/Inf values, or too low an SQNR."""
    if not verify_failed(res, min_sqnr):
        return None
    rows = res["tensors"]
    shapes = [r["name"] for r in rows if r["note"].startswith("shape")]
    nonfinite = [r["name"] for r in rows if math.isnan(r["sqnr_db"])]
    low = [
        r["name"]
        for r in rows
        if r["scheme"] and min_sqnr is not None and r["sqnr_db"] < min_sqnr and not r["note"]
    ]
    m = res["min_sqnr_db"]
    parts = [
        f"min SQNR {m:.2f} dB (threshold {min_sqnr:.2f} dB, {len(low)} tensor(s) below)"
        if low
        else "",
        f"NaN/Inf in {len(nonfinite)} tensor(s) (first: {nonfinite[0]})" if nonfinite else "",
        f"{len(res['missing'])} tensor(s) missing" if res["missing"] else "",
        f"{len(res['extra'])} tensor(s) not in the original" if res["extra"] else "",
        f"{len(shapes)} shape mismatch(es)" if shapes else "",
        f"{len(res['mismatched_copies'])} copied tensor(s) altered"
        if res["mismatched_copies"]
        else "",
    ]
    problem = "verification failed: " + (", ".join(p for p in parts if p) or "see the table")
    if res["missing"] or res["extra"] or shapes:
        fix = (
            "the two do not correspond: give the original checkpoint and the output of "
            "quantizing it (or quantize the original again)"
        )
    elif res["mismatched_copies"]:
        fix = "a tensor that should be a byte copy changed: quantize the original again"
    elif nonfinite:
        fix = (
            "check the original for NaN/Inf and quantize it again (--allow-nonfinite keeps such "
            "tensors in float)"
        )
    else:
        fix = (
            "quantize with a finer scheme (e.g. int8, or int4-group with group_size=32) or "
            "lower --min-sqnr"
        )
    return UsageError(problem, fix)
