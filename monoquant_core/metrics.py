"""Error metrics (SQNR, maximum and relative error) and the one NaN/Inf check."""

from __future__ import annotations

import math

import torch

__all__ = ["all_finite", "count_nonfinite", "error_stats", "sqnr_db"]


def all_finite(t: torch.Tensor) -> bool:
    """True when a float tensor holds no NaN/Inf (non-float and empty tensors are finite).

    Checks ``amin``/``amax`` (they propagate NaN), so no temporary as large as ``t`` is made.
    """
    if t.numel() == 0 or not t.is_floating_point():
        return True
    return bool(torch.isfinite(torch.stack([t.amin(), t.amax()])).all())


def count_nonfinite(t: torch.Tensor) -> int:
    """How many NaN/Inf values ``t`` holds (for messages; 0 for non-float tensors)."""
    if not t.is_floating_point():
        return 0
    return int((~torch.isfinite(t)).sum())


def error_stats(
    ref: torch.Tensor, approx: torch.Tensor, chunk: int = 1 << 20
) -> tuple[float, float, float]:
    """``(sqnr_db, max_abs_err, rel_err)`` of ``approx`` against ``ref``.

    Accumulated in float64 over chunks, so no temporary as large as the tensors is created.
    SQNR is ``10 log10(sum ref^2 / sum (ref - approx)^2)``: ``inf`` for an exact match
    (including an all-zero reference reproduced exactly), ``-inf`` for an all-zero reference
    that was not.
    """
    r, a = ref.detach().reshape(-1), approx.detach().reshape(-1)
    sig = err = peak = 0.0
    for i in range(0, r.numel(), chunk):
        rc = r[i : i + chunk].double()
        d = rc - a[i : i + chunk].double()
        sig += rc.square_().sum().item()
        peak = max(peak, d.abs().max().item())
        err += d.square_().sum().item()
    if err == 0.0:
        db = math.inf
    elif sig == 0.0:
        db = -math.inf
    else:
        db = 10.0 * math.log10(sig / err)
    return db, peak, math.sqrt(err) / max(math.sqrt(sig), 1e-30)


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - approx)^2)`` in dB.

    Returns ``inf`` for an exact match (including an all-zero reference reproduced exactly).
    """
    return error_stats(ref, approx)[0]
