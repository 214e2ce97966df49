"""The GPTQ solver (Frantar et al. 2022): error-feedback rounding of a weight matrix against
the Hessian of its inputs. Pure tensor code: no plugin machinery (see :mod:`.gptq`).

GPTQ's update uses the upper Cholesky factor ``U`` of ``H^-1``. Here ``U`` is never formed:
with ``H = R R^T`` (``R`` upper triangular, the Cholesky factor of the reversed ``H``),
``U = R^-1``, and the weight column ``j`` that GPTQ rounds is
``W'_j = W_j + sum_{i<j} (W_i - Q_i) R_ij / R_jj``. That is the same rounding sequence as the
reference algorithm (tested against it) for one Cholesky instead of three factorizations. Columns
are processed in blocks (``block_size``, default 128) with lazy (matrix-matrix) updates, and in
sub-blocks of 32 inside a block.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from monoquant_core import QParams, QuantSpec
from monoquant_core.metrics import all_finite

__all__ = ["GptqResult", "gptq_solve"]

_SUB = 32  # columns per sub-block: column-by-column updates only inside a sub-block


@dataclass
class GptqResult:
    """What :func:`gptq_solve` returns.

    Attributes:
        weight: ``[C, K]`` the values that were rounded (the error-updated weight, original
            column order). Rounding it with ``params`` (the scheme's own arithmetic)
            reproduces the codes exactly, which is how the scheme packs them.
        params: the scale / zero point used (``[C, G]``, or the static ``params`` as given).
        damp: the relative damping that worked (None after a fallback).
        fallback: None, or why the layer was rounded to nearest instead.
        spec / code_shift: how ``weight`` is rounded (see :meth:`qweight`).
    """

    weight: torch.Tensor
    params: QParams
    damp: float | None
    fallback: str | None
    spec: QuantSpec
    code_shift: int = 0

    def qweight(self) -> torch.Tensor:
        """``[C, K]`` dequantized result ``(q - zero) * scale`` (float32)."""
        c, k = self.weight.shape
        return _round(
            self.weight,
            _expand(self.params, c),
            self.spec,
            self.spec.group_size or k,
            self.code_shift,
        )


def gptq_solve(
    w: torch.Tensor,
    hessian: torch.Tensor | None,
    spec: QuantSpec,
    *,
    grid: Callable[[torch.Tensor], QParams] | None = None,
    params: QParams | None = None,
    block_size: int = 128,
    damp: float = 0.01,
    act_order: bool = False,
    retries: int = 3,
    code_shift: int = 0,
) -> GptqResult:
    """GPTQ-quantize the ``[C, K]`` matrix ``w`` against the ``[K, K]`` Hessian of its inputs.

    Args:
        w: weight, rows = output channels, columns = the inputs that ``hessian`` describes.
        hessian: ``2 X^T X / rows`` (any positive scale); None means "no data": round to nearest.
        spec: the scheme's :class:`QuantSpec` (``qmin``/``qmax``, ``group_size``).
        grid: ``grid(cols) -> QParams`` for ``[C, n]`` columns (``ceil(n / group_size)`` groups),
            parameters already rounded to their stored dtype; called when a group starts, on
            the error-updated weights (dynamic groups), and on ``w`` for a fallback.
        params: static parameters (``[C, G]``, or ``[1, 1]`` per tensor), used instead of
            ``grid`` (per-channel schemes, ``static_groups``, ``act_order``).
        block_size: columns per lazy-update block.
        damp: relative damping (fraction of the mean diagonal).
        act_order: process columns in decreasing ``diag(H)`` order (needs ``params`` when the
            spec is group-wise, so that the groups stay the standard consecutive ones).
        retries: damping increases (x10 each) tried when the factorization fails.
        code_shift: added to codes before the clamp/floor, to match the scheme's packing
            arithmetic bit for bit (``-qmin`` for ``int4-group``, 0 for ``int8``).

    Returns:
        A :class:`GptqResult`. Never raises on bad numerics: a Hessian that cannot be factored
        at any damping, or a non-finite result, gives round-to-nearest with ``fallback`` set.
    """
    if params is None and grid is None:
        raise ValueError("gptq_solve needs grid or params")
    if act_order and params is None and spec.group_size is not None:
        raise ValueError("act_order with groups needs static params")
    w = w.detach().to(torch.float32)
    c, k = w.shape
    gs = spec.group_size or k
    static = None if params is None else _expand(params, c)
    why, used = "saw no calibration data", None
    if hessian is not None:
        (r, perm), used, why = _factor(hessian, damp, retries, act_order)
    if why is None:
        res = _solve(w, r, perm, spec, grid, static, block_size, gs, code_shift)
        if res is not None:
            wq, p = res
            return GptqResult(wq, params if params is not None else p, used, None, spec, code_shift)
        why = "GPTQ produced non-finite values"
    qp = params if params is not None else grid(w)
    return GptqResult(w, qp, None, why, spec, code_shift)


def _expand(p: QParams, c: int) -> QParams:
    s = p.scale.to(torch.float32)
    z = None if p.zero_point is None else p.zero_point.to(torch.float32)
    if s.shape[0] == 1 and c != 1:
        s = s.expand(c, -1)
        z = None if z is None else z.expand(c, -1)
    return QParams(s, z)


def _factor(
    h: torch.Tensor, damp: float, retries: int, act_order: bool
) -> tuple[tuple[Any, Any], float | None, str | None]:
    """``((R / diag(R), perm), damp_used, None)`` with ``H = R R^T``, or a failure reason.

    Dead inputs (``H_jj == 0``: the input was always 0) are decoupled (row and column zeroed,
    ``H_jj = 1``), so their columns are rounded to nearest and pass no error on.
    """
    h = h.detach()
    if h.dtype not in (torch.float32, torch.float64):
        h = h.to(torch.float32)
    if not all_finite(h):
        return (None, None), None, "Hessian holds NaN/Inf"
    diag = torch.diagonal(h)
    if bool((diag < 0).any()):
        return (None, None), None, "the Hessian has negative diagonal entries (not X^T X)"
    dead = diag == 0
    if bool(dead.all()):
        return (None, None), None, "saw no calibration data (the Hessian is zero)"
    mean = float(diag[~dead].mean())
    perm = None
    if act_order:
        perm = torch.argsort(torch.where(dead, 0.0, diag), descending=True, stable=True)
        rev = perm.flip(0)
        hf = h.index_select(0, rev).index_select(1, rev)  # P H_perm P (2x faster than h[i, j])
    else:
        hf = h.flip(0, 1)
    dead_f = torch.diagonal(hf) == 0
    if bool(dead_f.any()):
        idx = torch.nonzero(dead_f).flatten()
        hf[idx, :] = 0
        hf[:, idx] = 0
        hf[idx, idx] = 1.0
    lam = damp
    for _ in range(retries + 1):
        hf.diagonal().add_(lam * mean)
        low, info = torch.linalg.cholesky_ex(hf)
        hf.diagonal().sub_(lam * mean)
        if int(info) == 0 and all_finite(low.diagonal()) and bool((low.diagonal() > 0).all()):
            r = low.flip(0, 1)  # upper triangular, H = R R^T
            return (r.div_(r.diagonal().clone()).to(torch.float32), perm), lam, None
        lam *= 10.0
    return (
        (None, None),
        None,
        f"the Cholesky factorization failed up to damp={lam / 10:g} (Hessian not positive "
        "definite)",
    )


def _codes(x, inv, off, lo, hi, out):
    """``floor(clamp(x * inv + off, lo, hi))``: the scheme's own rounding arithmetic."""
    torch.mul(x, inv, out=out)
    return out.add_(off).clamp_(lo, hi).floor_()


def _round(w: torch.Tensor, qp: QParams, spec: QuantSpec, gs: int, shift: int) -> torch.Tensor:
    """Round-to-nearest ``[C, K]`` with ``[C, G]`` params, dequantized."""
    c, k = w.shape
    ng = qp.scale.shape[1]
    pad = ng * gs - k
    x = torch.cat([w, w[:, -1:].expand(c, pad)], 1) if pad > 0 else w
    x = x.reshape(c, ng, gs)
    s, z = qp.scale.unsqueeze(-1), None if qp.zero_point is None else qp.zero_point.unsqueeze(-1)
    off = 0.5 + shift if z is None else z + (0.5 + shift)
    q = torch.empty_like(x)
    _codes(x, s.reciprocal(), off, spec.qmin + shift, spec.qmax + shift + 0.5, q)
    q.sub_(shift)
    if z is not None:
        q.sub_(z)
    return q.mul_(s).reshape(c, ng * gs)[:, :k]


def _solve(w, r, perm, spec, grid, static, block_size, gs, shift):
    """The blocked GPTQ loop on transposed data: ``(W', params)``, None when not finite.

    ``wt`` (``[K, C]``, one weight column per row, original order; a copy, never the
    caller's tensor) is overwritten block by block with the error-updated values that were
    rounded. ``dt`` holds ``W - Q`` of the columns done, in processing order.
    """
    c, k = w.shape
    wt = w.t().clone(memory_format=torch.contiguous_format)  # [K, C]
    dt = torch.empty_like(wt)
    sub = math.gcd(_SUB, gs) if gs < k else _SUB  # every group starts a sub-block
    step = math.lcm(gs if gs < k else 1, sub)
    block = max(step, -(-block_size // step) * step)
    lo, hi = spec.qmin + shift, spec.qmax + shift + 0.5
    xb_buf, wb_buf = torch.empty(min(block, k), c), torch.empty(min(block, k), c)
    tmp = torch.empty(c)
    dyn_s: list[torch.Tensor] = []
    dyn_z: list[torch.Tensor] = []
    if static is not None:
        gidx = (perm if perm is not None else torch.arange(k)) // gs
        gidx = gidx.clamp_(max=static.scale.shape[1] - 1)
        s_all = static.scale.t()
        z_all = None if static.zero_point is None else static.zero_point.t()
    for i1 in range(0, k, block):
        i2 = min(i1 + block, k)
        xb, wb = xb_buf[: i2 - i1], wb_buf[: i2 - i1]  # updated / original columns
        if perm is None:
            wb.copy_(wt[i1:i2])
        else:
            torch.index_select(wt, 0, perm[i1:i2], out=wb)
        xb.copy_(wb)
        if i1 > 0:
            xb.addmm_(r[:i1, i1:i2].t(), dt[:i1])
        if static is not None:
            gi = gidx[i1:i2]
            s_b = s_all[gi]
            inv_b = s_b.reciprocal()
            off_b = (0.5 + shift) if z_all is None else z_all[gi] + (0.5 + shift)
            # W - (c - shift - z) * s  ==  (W + (shift + z) * s) - c * s
            wz_b = wb + s_b * (shift if z_all is None else z_all[gi] + shift)
        for s1 in range(i1, i2, sub):
            s2 = min(s1 + sub, i2)
            if static is None and s1 % gs == 0:
                g0, g1 = s1 - i1, min(s1 + gs, k) - i1
                qp = grid(_group_state(xb, wb, r, i1, g0, g1).t())
                dyn_s.append(qp.scale[:, :1].to(torch.float32))
                s_g = dyn_s[-1][:, 0].contiguous()
                inv_g = s_g.reciprocal()
                off_g, zs_g = 0.5 + shift, s_g * shift
                if qp.zero_point is not None:
                    dyn_z.append(qp.zero_point[:, :1].to(torch.float32))
                    z_g = dyn_z[-1][:, 0].contiguous()
                    off_g, zs_g = z_g + (0.5 + shift), s_g * (z_g + shift)
                wz_g = wb[g0:g1] + zs_g
            for j in range(s1, s2):
                jj = j - i1
                x = xb[jj]
                if j > s1:
                    x.addmv_(dt[s1:j].t(), r[s1:j, j])
                if static is not None:
                    inv, s_j, wz = inv_b[jj], s_b[jj], wz_b[jj]
                    off = off_b if z_all is None else off_b[jj]
                else:
                    inv, s_j, off, wz = inv_g, s_g, off_g, wz_g[jj - g0]
                q = _codes(x, inv, off, lo, hi, tmp)
                torch.addcmul(wz, q, s_j, value=-1.0, out=dt[j])
            if s2 < i2:
                xb[s2 - i1 :].addmm_(r[s1:s2, s2:i2].t(), dt[s1:s2])
        if perm is None:
            wt[i1:i2] = xb
        else:
            wt.index_copy_(0, perm[i1:i2], xb)
    if not (all_finite(dt) and all_finite(wt)):
        return None
    params = None
    if static is None:
        params = QParams(torch.cat(dyn_s, 1), torch.cat(dyn_z, 1) if dyn_z else None)
    return wt.t(), params


def _group_state(xb, wb, r, i1, g0, g1):
    """The error-updated weights of block rows ``g0:g1`` once every column before is done.

    ``xb`` holds ``W_j + sum_{i<g} D_i R_ij / R_jj`` for them (``wb``: ``W``); the weights
    GPTQ's sequential updates give at that point are ``W_G + (D_q R_qG) R_GG^-1``, i.e. the
    partial correction ``T`` times the inverse of the unit-diagonal block ``R~_GG``.
    """
    n = g1 - g0
    t = xb[g0:g1] - wb[g0:g1]
    a = i1 + g0
    eye = torch.eye(n, dtype=r.dtype)
    inv = torch.linalg.solve_triangular(
        r[a : a + n, a : a + n].t(), eye, upper=False, unitriangular=True
    )
    return torch.addmm(wb[g0:g1], inv, t)  # a GEMM: 5x faster than a triangular solve here
