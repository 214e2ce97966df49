"""Error metrics (SQNR, maximum and relative error) and the one NaN/Inf check."""

from __future__ import annotations

import math

import torch

__all__ = ["ErrorStats", "all_finite", "count_nonfinite", "error_stats", "sqnr_db"]


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


class ErrorStats:
    """Streaming ``(sqnr_db, max_abs_err, rel_err)``: feed ``(ref, approx)`` pieces with
    :meth:`add`, read :meth:`result`. Float32 BLAS dot products over a reused buffer (float64
    when an input is float64, or for a piece whose squares overflow float32)."""

    def __init__(self, chunk: int = 1 << 18) -> None:
        self.chunk = chunk
        self.sig = self.err = self.peak = 0.0
        self._buf: torch.Tensor | None = None

    def add(self, ref: torch.Tensor, approx: torch.Tensor) -> None:
        r, a = ref.detach().reshape(-1), approx.detach().reshape(-1)
        wide = torch.float64 in (r.dtype, a.dtype)
        for i in range(0, r.numel(), self.chunk):
            rc, ac = r[i : i + self.chunk], a[i : i + self.chunk]
            s, e, p = self._piece(rc, ac, torch.float64 if wide else torch.float32)
            if not wide and not (math.isfinite(s) and math.isfinite(e)):
                s, e, p = self._piece(rc, ac, torch.float64)
            self.sig, self.err, self.peak = self.sig + s, self.err + e, max(self.peak, p)

    def _piece(self, r: torch.Tensor, a: torch.Tensor, dtype: torch.dtype) -> tuple[float, ...]:
        rc = r.to(dtype)
        buf = self._buf
        if buf is None or buf.dtype != dtype or buf.numel() < rc.numel():
            buf = self._buf = torch.empty(max(self.chunk, rc.numel()), dtype=dtype)
        d = buf[: rc.numel()]
        torch.sub(rc, a.to(dtype), out=d)
        sig, err = torch.dot(rc, rc).item(), torch.dot(d, d).item()
        return sig, err, d.abs_().max().item() if d.numel() else 0.0

    def result(self) -> tuple[float, float, float]:
        if self.err == 0.0:
            db = math.inf
        elif self.sig == 0.0:
            db = -math.inf
        else:
            ratio = self.sig / self.err  # nan/inf sums (non-finite tensors) stay defined
            db = -math.inf if ratio == 0.0 else 10.0 * math.log10(ratio)
        return db, self.peak, math.sqrt(self.err) / max(math.sqrt(self.sig), 1e-30)


def error_stats(
    ref: torch.Tensor, approx: torch.Tensor, chunk: int = 1 << 18
) -> tuple[float, float, float]:
    """``(sqnr_db, max_abs_err, rel_err)`` of ``approx`` against ``ref`` (see
    :class:`ErrorStats`: streamed, no temporary as large as the tensors).

    SQNR is ``10 log10(sum ref^2 / sum (ref - approx)^2)``: ``inf`` for an exact match
    (including an all-zero reference reproduced exactly), ``-inf`` for an all-zero reference
    that was not.
    """
    acc = ErrorStats(chunk)
    acc.add(ref, approx)
    return acc.result()


def sqnr_db(ref: torch.Tensor, approx: torch.Tensor) -> float:
    """Signal-to-quantization-noise ratio ``10 log10(sum ref^2 / sum (ref - approx)^2)`` in dB.

    Returns ``inf`` for an exact match (including an all-zero reference reproduced exactly).
    """
    return error_stats(ref, approx)[0]
