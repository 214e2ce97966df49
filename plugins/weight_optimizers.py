"""Data-free parameter search for low-bit group-wise weights (used by ``int4-group``).

Every function works on one row block ``x`` of shape ``[R, G, S]`` (float32), vectorised over
all ``R * G`` groups, and returns float32 ``(scale, zero)`` of shape ``[R, G]`` for
``w = (q - zero) * scale``. Callers process a big weight block by block so temporaries stay in
cache (a whole 4096x4096 temporary costs more in page faults than the arithmetic).

* :func:`ls_refit` — llama.cpp K-quant style: a grid of candidate inverse scales over the
  observed range, each followed by a closed-form least-squares fit of scale and (float) offset;
  the best candidate per group wins, then a few Lloyd steps (reassign codes, refit).
* :func:`ls_refit_symmetric` — the symmetric sibling: candidate scales that put the signed
  extreme on the asymmetric end code, scale refit ``sum(xL) / sum(L^2)``.
* :func:`hqq` — half-quadratic optimisation of a float zero point with the scale fixed
  (Badri & Shaji 2023): sparsity-promoting ``|.|^0.7`` error, closed-form zero updates.
"""

from __future__ import annotations

import torch

from monoquant_core.affine import Scratch

__all__ = ["hqq", "lloyd", "ls_refit", "ls_refit_symmetric"]


def _fit(x: torch.Tensor, codes: torch.Tensor, sx: torch.Tensor, sxx: torch.Tensor, sc: Scratch):
    """Least squares ``min_{d,m} sum (d*L + m - x)^2`` per group: ``(d, m, err, ok)``."""
    n = x.shape[-1]
    sl = codes.sum(-1)
    sll = torch.linalg.vector_norm(codes, dim=-1).square_()
    slx = torch.mul(codes, x, out=sc.get("fit.lx", tuple(x.shape))).sum(-1)
    det = n * sll - sl * sl
    ok = det > 0
    inv = torch.where(ok, det, 1.0).reciprocal_()
    d = (n * slx - sx * sl).mul_(inv)
    m = (sll * sx - sl * slx).mul_(inv)
    # at the least-squares optimum the residual is sxx - d*slx - m*sx (fewer small ops than
    # expanding the square; groups where it is not an optimum are rejected through ``ok``)
    err = sxx - d * slx - m * sx
    return d, m, err, ok & (d > 0)


def ls_refit(
    x: torch.Tensor,
    lo: torch.Tensor,
    hi: torch.Tensor,
    qmax: int,
    numerators: list[float],
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid of inverse scales ``num / (hi - lo)`` + closed-form refit; returns (scale, zero).

    The plain ``[lo, hi]`` min/max fit is the fallback for groups where no candidate helps
    (constant groups keep it exactly). Each candidate costs the passes that make its codes and
    their three sums; the refit of every candidate and the choice of the best are then done
    at once on the ``[candidates, R, G]`` sums (the earliest of equally good candidates wins).
    """
    sc = scratch or Scratch()
    shape = tuple(x.shape)
    n = shape[-1]
    span = hi - lo
    scale = torch.where(span > 0, span / qmax, torch.where(lo != 0, lo.abs(), torch.ones_like(lo)))
    xm = torch.sub(x, lo.unsqueeze(-1), out=sc.get("ls.xm", shape))
    sx = x.sum(-1)
    sxx = torch.linalg.vector_norm(x, dim=-1).square_()
    codes = sc.get("ls.codes", shape)
    # Baseline: the observer's own range, rounded to nearest.
    torch.mul(xm, scale.reciprocal().unsqueeze(-1), out=codes).clamp_(0, qmax).round_()
    codes.mul_(scale.unsqueeze(-1)).add_(lo.unsqueeze(-1)).sub_(x)
    base_err = torch.linalg.vector_norm(codes, dim=-1).square_()
    inv_span = torch.where(span > 0, 1.0 / span, torch.zeros_like(span)).unsqueeze(-1)
    stats = sc.get("ls.stats", (3, len(numerators), *shape[:-1]))
    sl, sll, slx = stats[0], stats[1], stats[2]
    lx = sc.get("fit.lx", shape)
    for i, num in enumerate(numerators):
        torch.mul(xm, inv_span * num, out=codes).clamp_(0, qmax).round_()
        torch.sum(codes, -1, out=sl[i])
        torch.linalg.vector_norm(codes, dim=-1, out=sll[i])
        torch.sum(torch.mul(codes, x, out=lx), -1, out=slx[i])
    sll.square_()
    det = n * sll - sl * sl
    ok = det > 0
    inv = torch.where(ok, det, 1.0).reciprocal_()
    d = (n * slx - sx * sl).mul_(inv)
    m = (sll * sx - sl * slx).mul_(inv)
    err = sxx - d * slx - m * sx  # the least-squares residual at the optimum
    err = torch.where(ok & (d > 0), err, torch.inf)
    best_err, idx = err.min(0)
    better = best_err < base_err
    pick = idx.unsqueeze(0)
    best_d = torch.where(better, d.gather(0, pick)[0], scale)
    best_m = torch.where(better, m.gather(0, pick)[0], lo)
    return best_d, -best_m / best_d


def lloyd(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    steps: int,
    scratch: Scratch | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Alternate "assign nearest codes" and "refit scale and offset"; never increases error."""
    sc = scratch or Scratch()
    shape = tuple(x.shape)
    sx = x.sum(-1)
    sxx = torch.linalg.vector_norm(x, dim=-1).square_()
    codes, tmp = sc.get("lloyd.codes", shape), sc.get("lloyd.tmp", shape)
    for _ in range(steps):
        torch.mul(x, scale.reciprocal().unsqueeze(-1), out=codes)
        codes.add_(zero.unsqueeze(-1)).clamp_(0, qmax).round_()
        torch.sub(codes, zero.unsqueeze(-1), out=tmp).mul_(scale.unsqueeze(-1)).sub_(x)
        cur = torch.linalg.vector_norm(tmp, dim=-1).square_()
        d, m, err, ok = _fit(x, codes, sx, sxx, sc)
        better = ok & (err < cur)
        scale = torch.where(better, d, scale)
        zero = torch.where(better, -m / d, zero)
    return scale, zero


def ls_refit_symmetric(
    x: torch.Tensor, amax: torch.Tensor, qmin: int, qmax: int, steps: int = 9
) -> torch.Tensor:
    """Symmetric scale search (llama.cpp ``make_qx_quants``); returns the scale ``[R, G]``.

    Candidates put the signed extreme near the code ``qmin`` (e.g. -8 for 4 bits), which uses
    the asymmetric extra code; each candidate's scale is refit as ``sum(xL) / sum(L^2)``.
    """
    idx = x.abs().argmax(-1, keepdim=True)
    signed = x.gather(-1, idx).squeeze(-1)
    signed = torch.where(signed >= 0, amax, -amax)  # observer-clipped, with the extreme's sign
    nmax = -qmin
    best_s = torch.where(amax > 0, amax / qmax, torch.ones_like(amax))
    codes = (x / best_s.unsqueeze(-1)).clamp_(qmin, qmax).round_()
    best_score = torch.linalg.vecdot(codes, x).square_() / torch.linalg.vector_norm(
        codes, dim=-1
    ).square_().clamp_min(1e-30)
    safe = torch.where(signed != 0, signed, torch.ones_like(signed))
    for k in range(-steps, steps + 1):
        iscale = -(nmax + 0.1 * k) / safe
        codes = (x * iscale.unsqueeze(-1)).clamp_(qmin, qmax).round_()
        sxl = torch.linalg.vecdot(codes, x)
        sll = torch.linalg.vector_norm(codes, dim=-1).square_()
        score = sxl * sxl / sll.clamp_min(1e-30)
        better = (sll > 0) & (score > best_score) & (sxl > 0)
        best_score = torch.where(better, score, best_score)
        best_s = torch.where(better, sxl / sll.clamp_min(1e-30), best_s)
    return best_s


def hqq(
    x: torch.Tensor,
    scale: torch.Tensor,
    zero: torch.Tensor,
    qmax: int,
    iters: int = 20,
    p: float = 0.7,
    beta: float = 10.0,
    kappa: float = 1.01,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Half-quadratic zero-point optimisation with the scale fixed; returns (scale, zero)."""
    inv = scale.reciprocal().unsqueeze(-1)
    z = zero.unsqueeze(-1).clone()
    best_z = z.clone()
    best_err = None
    for _ in range(iters):
        codes = (x * inv).add_(z).clamp_(0, qmax).round_()
        delta = x - (codes - z) / inv
        err = delta.abs().mean(-1, keepdim=True)
        if best_err is None:
            best_err = err
        else:
            improved = err < best_err
            if not bool(improved.any()):
                break
            best_err = torch.where(improved, err, best_err)
            best_z = torch.where(improved, z, best_z)
        mag = delta.abs()
        shrunk = torch.sign(delta) * torch.relu(mag - mag.clamp_min(1e-12).pow(p - 1) / beta)
        z = (codes - (x - shrunk) * inv).mean(-1, keepdim=True)
        beta *= kappa
    return scale, best_z.squeeze(-1)
