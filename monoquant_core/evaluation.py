"""``monoquant evaluate``: the float model and one or more quantized files of it, run on the
user's own inputs and compared output against output.

Every file is loaded with :func:`monoquant_core.load` into a freshly built model (the same
modules and backends a user gets), every batch runs through the float model once and through
each quantized model, and the floating outputs (every floating tensor the model returns,
tuples / dicts / Hugging Face outputs included, in order) are compared over all batches:
output SQNR (dB), cosine similarity, maximum absolute error, and for classifier-like outputs
(a 2-D ``[batch, classes]`` first output, or any first output with ``top1=True``) the share of
rows whose arg-max agrees. Size and bits per weight come from the files' headers.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

import torch
from torch import nn

from .batches import first_line, iter_batches
from .errors import MonoQuantError, UsageError
from .files import load_model
from .inspection import inspect_path
from .registry import Registries
from .sources import read_artifact
from .tables import (
    format_table,
    html_heading,
    html_page,
    html_table,
    html_text,
    human_bytes,
    svg_bars,
)

__all__ = ["evaluate_files", "evaluation_error", "evaluation_html", "render_evaluation"]


def _tensors(out: Any) -> list[torch.Tensor]:
    """The floating tensors of a model output, in a fixed order."""
    if isinstance(out, torch.Tensor):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    if hasattr(out, "to_tuple"):  # a Hugging Face ModelOutput
        return _tensors(out.to_tuple())
    return []


def _run(model: nn.Module, batches: list[Any], what: str) -> list[list[torch.Tensor]]:
    outs = []
    with torch.no_grad():
        for i, (args, kwargs) in enumerate(batches):
            try:
                got = _tensors(model(*args, **kwargs))
            except MonoQuantError:
                raise
            except Exception as e:
                where = _failing_module(model, args, kwargs)
                raise UsageError(
                    f"batch {i} failed in the {what}{where}: {type(e).__name__}: {first_line(e)}",
                    "pass inputs the model takes (the --calibration formats)",
                ) from e
            if not got:
                raise UsageError(
                    f"the {what} returned no floating tensor for batch {i}",
                    "evaluate a model whose forward returns tensors (or tuples / dicts of them)",
                )
            outs.append([t.detach().to("cpu", torch.float64) for t in got])
    return outs


def _failing_module(model: nn.Module, args: tuple, kwargs: dict) -> str:
    """`` in module 'NAME' (Type)``: the innermost module whose forward was running when the
    batch failed (the batch run again with hooks on every module), or ``""``."""
    open_calls: list[str] = []
    handles = []
    mods = dict(model.named_modules())

    def enter(name: str, *_: Any) -> None:
        open_calls.append(name)

    def leave(name: str, *_: Any) -> None:
        open_calls.pop()

    try:
        for name, mod in mods.items():
            if name:
                handles.append(mod.register_forward_pre_hook(partial(enter, name)))
                handles.append(mod.register_forward_hook(partial(leave, name)))
        model(*args, **kwargs)
    except Exception:  # the same failure, now with the module it happened in
        if open_calls:
            name = open_calls[-1]
            return f" in module {name!r} ({type(mods[name]).__name__})"
    finally:
        for h in handles:
            h.remove()
    return ""


def _same_model(state: dict[str, torch.Tensor], tensors: dict[str, Any], path: str) -> None:
    """Refuse a file whose float tensors (biases, norms, ...: what quantization leaves as it
    is) differ from the float model's: it was quantized from another model."""
    for name, t in tensors.items():
        ref = state.get(name)
        if not isinstance(t, torch.Tensor) or ref is None or ref.shape != t.shape:
            continue  # a missing or reshaped tensor: loading the file reports it
        if not torch.equal(ref.detach().to(t.dtype), t):
            raise UsageError(
                f"{os.path.basename(path)} was quantized from another model: its float "
                f"tensor {name!r} differs from the float model's",
                "evaluate only files quantized from the float model given (--model, "
                "--weights); files from different models need one evaluate each",
            )


def _compare(ref: list[list[torch.Tensor]], got: list[list[torch.Tensor]], top1: bool | None):
    num = den = dot = na = nb = 0.0
    max_err = 0.0
    agree = rows = 0
    for r_out, g_out in zip(ref, got, strict=True):
        if [t.shape for t in r_out] != [t.shape for t in g_out]:
            raise UsageError(
                "a quantized model returned outputs of other shapes than the float model",
                "evaluate files quantized from this model",
            )
        for r, g in zip(r_out, g_out, strict=True):
            d = g - r
            num += float((r * r).sum())
            den += float((d * d).sum())
            dot += float((r * g).sum())
            na += float((r * r).sum())
            nb += float((g * g).sum())
            if d.numel():
                max_err = max(max_err, float(d.abs().max()))
        first_r, first_g = r_out[0], g_out[0]
        classify = top1 if top1 is not None else first_r.dim() == 2
        if classify and first_r.dim() >= 2 and first_r.shape[-1] > 1:
            a = first_r.reshape(-1, first_r.shape[-1]).argmax(-1)
            b = first_g.reshape(-1, first_g.shape[-1]).argmax(-1)
            agree += int((a == b).sum())
            rows += a.numel()
    finite = all(math.isfinite(x) for x in (num, den, dot, na, nb, max_err))
    if not finite:
        sqnr = cos = float("nan")
    else:
        sqnr = float("inf") if den == 0 else 10 * math.log10(num / den) if num > 0 else -math.inf
        cos = dot / math.sqrt(na * nb) if na > 0 and nb > 0 else float("nan")
    return {
        "sqnr_db": sqnr,
        "cosine": cos,
        "max_abs_err": max_err,
        "top1_agreement": agree / rows if rows else None,
    }


def _size(path: str) -> int:
    if os.path.isdir(path):
        return sum(
            os.path.getsize(os.path.join(path, f))
            for f in os.listdir(path)
            if f.endswith(".safetensors")
        )
    return os.path.getsize(path)


def evaluate_files(
    registries: Registries,
    build: Callable[[], nn.Module],
    quantized: list[str],
    data: Any,
    *,
    backend: str | None = None,
    top1: bool | None = None,
) -> dict[str, Any]:
    """See :meth:`monoquant_core.Engine.evaluate`."""
    if not quantized:
        raise UsageError("no quantized file to evaluate", "pass one or more files or folders")
    for path in quantized:
        if not os.path.exists(path):
            raise UsageError(f"quantized file {path!r} does not exist", "check the path")
    batches = list(iter_batches(data))
    reference = build().eval()
    float_bytes = sum(t.numel() * t.element_size() for t in reference.state_dict().values())
    ref = _run(reference, batches, "float model")
    del reference
    rows = []
    for path in quantized:
        info = inspect_path(registries, path)
        artifact = read_artifact(registries, path)
        fresh = build().eval()
        _same_model(fresh.state_dict(), artifact.tensors, path)
        model = load_model(registries, path, fresh, backend=backend, artifact=artifact)
        got = _run(model, batches, f"model loaded from {os.path.basename(path)}")
        del model
        schemes = sorted({t["scheme"] for t in info["tensors"] if t["quantized"]})
        rows.append(
            {
                "path": path,
                "schemes": schemes,
                "bytes": _size(path),
                "bits_per_weight": info["totals"]["quantized_bits_per_weight"],
                "quantized_tensors": info["totals"]["quantized"],
                **_compare(ref, got, top1),
            }
        )
    return {"batches": len(batches), "float_bytes": float_bytes, "files": rows}


def _fails(row: dict[str, Any], min_sqnr: float | None, min_cosine: float | None) -> list[str]:
    why = []
    if min_sqnr is not None and not row["sqnr_db"] >= min_sqnr:
        why.append(f"SQNR {row['sqnr_db']:.2f} dB < {min_sqnr:g}")
    if min_cosine is not None and not row["cosine"] >= min_cosine:
        why.append(f"cosine {row['cosine']:.6f} < {min_cosine:g}")
    return why


def render_evaluation(
    res: dict[str, Any], min_sqnr: float | None = None, min_cosine: float | None = None
) -> str:
    def num(x: float | None, fmt: str) -> str:
        if x is None:
            return "-"
        return "inf" if math.isinf(x) and x > 0 else "nan" if math.isnan(x) else format(x, fmt)

    rows = [["float model", "-", human_bytes(res["float_bytes"]), "-", "-", "-", "-", "-", "-"]]
    for r in res["files"]:
        rows.append(
            [
                r["path"],
                ",".join(r["schemes"]) or "-",
                human_bytes(r["bytes"]),
                num(r["bits_per_weight"], ".2f"),
                num(r["sqnr_db"], ".2f"),
                num(r["cosine"], ".6f"),
                num(r["max_abs_err"], ".3g"),
                num(r["top1_agreement"], ".2%"),
                "FAIL" if _fails(r, min_sqnr, min_cosine) else "ok",
            ]
        )
    head = [
        "model",
        "schemes",
        "size",
        "bits/weight",
        "SQNR dB",
        "cosine",
        "max err",
        "top-1",
        "check",
    ]
    return (
        format_table(head, rows) + f"\n{res['batches']} batch(es); outputs against the float model"
    )


def evaluation_error(
    res: dict[str, Any], min_sqnr: float | None, min_cosine: float | None
) -> UsageError | None:
    """The one-line error when a file is under a threshold (None when every file passed)."""
    bad = [(r["path"], _fails(r, min_sqnr, min_cosine)) for r in res["files"]]
    bad = [(p, w) for p, w in bad if w]
    if not bad:
        return None
    return UsageError(
        "below the threshold: " + "; ".join(f"{p}: {', '.join(w)}" for p, w in bad),
        "quantize those layers with more bits (e.g. --rule 'NAME=int8'), or relax the threshold",
    )


def evaluation_html(res: dict[str, Any]) -> str:
    """The evaluation as one self-contained HTML page: output SQNR bars and the table (every
    number also in ``data-value`` attributes)."""
    rows = [
        [
            r["path"],
            ",".join(r["schemes"]) or "-",
            r["bytes"],
            r["bits_per_weight"] if r["bits_per_weight"] is not None else "-",
            r["sqnr_db"],
            r["cosine"],
            r["max_abs_err"],
            r["top1_agreement"] if r["top1_agreement"] is not None else "-",
        ]
        for r in res["files"]
    ]
    head = ["file", "schemes", "bytes", "bits/weight", "SQNR dB", "cosine", "max err", "top-1"]
    bars = [(os.path.basename(r["path"]), r["sqnr_db"]) for r in res["files"]]
    return html_page(
        "Mono Quant evaluation",
        [
            html_text(
                f"{len(res['files'])} quantized file(s) against the float model "
                f"({human_bytes(res['float_bytes'])}) on {res['batches']} batch(es)."
            ),
            html_heading("Output SQNR against the float model"),
            svg_bars(bars, "dB", "sqnr"),
            html_heading("Every file"),
            html_table(head, rows, "files"),
        ],
    )
