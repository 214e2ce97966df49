"""``gptq`` plugin: calibration-based error-feedback rounding (GPTQ, Frantar et al. 2022).

For every planned Linear, Conv1d/Conv2d and GPT-2 ``Conv1D`` it accumulates the input Hessian
``H = 2 X^T X / rows`` during calibration (:class:`HessianCollector`, fed by the core through
``monoquant_collectors``), then quantizes the weight column by column, spreading each column's
rounding error over the columns not yet quantized (:func:`gptq_solve`). The result is an
ordinary ``int4-group`` or ``int8`` QTensor packed by the scheme's own ``quantize``: a file
written with GPTQ loads and runs without this plugin.

Enable it with ``--gptq`` (CLI) or ``plugin_options={"gptq": {}}`` (Python); it needs
calibration data (``--calibration`` / ``calibration=``). See docs/schemes/gptq.md.

Solver notes. GPTQ's update uses the upper Cholesky factor ``U`` of ``H^-1``. Here ``U`` is
never formed: with ``H = R R^T`` (``R`` upper triangular, the Cholesky factor of the reversed
``H``), ``U = R^-1``, and the weight column ``j`` that GPTQ rounds is
``W'_j = W_j + sum_{i<j} (W_i - Q_i) R_ij / R_jj``. That is the same rounding sequence as the
reference algorithm (tested against it) for one Cholesky instead of three factorizations. Columns
are processed in blocks (``block_size``, default 128) with lazy (matrix-matrix) updates, and in
sub-blocks of 32 inside a block.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F

from monoquant_core import ComponentConfig, QParams, QuantSpec, UsageError, hookimpl
from monoquant_core.config import config_to_dict, parse_options

__all__ = [
    "GptqConfig",
    "GptqResult",
    "GptqWarning",
    "HessianCollector",
    "gptq_solve",
    "parse_config",
]

_SUB = 32  # columns per sub-block: column-by-column updates only inside a sub-block
_DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass(frozen=True)
class GptqConfig(ComponentConfig):
    """Options of the ``gptq`` plugin (``--gptq-opt KEY=VALUE`` / ``plugin_options``).

    Attributes:
        damp: damping added to the Hessian's diagonal, as a fraction of its mean diagonal.
        block_size: columns per lazy-update block (rounded up to a multiple of the group size
            and of 32).
        act_order: quantize columns in decreasing order of ``diag(H)`` (default; implies
            static groups, so the saved layout stays the standard one). ``false`` gives
            classic GPTQ with group parameters recomputed from the error-updated weights.
        static_groups: compute every group's scale/zero from the original weight up front
            instead of from the error-updated weights when the group starts.
        grid: how a group's scale/zero point are chosen: ``scheme`` (default: the observer's
            range refined by the scheme's own search, e.g. ``int4-group``'s ``method``, ``lsq``
            by default) or ``observer`` (the observer's range only, as in the GPTQ paper).
        hessian_dtype: ``float32`` (default) or ``float64`` accumulation and factorization.
        retries: how many times the damping is multiplied by 10 when the Cholesky factorization
            fails, before the layer falls back to round-to-nearest.
    """

    damp: float = 0.01
    block_size: int = 128
    act_order: bool = True
    static_groups: bool = False
    grid: Literal["observer", "scheme"] = "scheme"
    hessian_dtype: Literal["float32", "float64"] = "float32"
    retries: int = 3

    def __post_init__(self) -> None:
        if not (self.damp > 0 and math.isfinite(self.damp)):
            raise ValueError(f"damp must be a positive number, not {self.damp}")
        if self.block_size < 1:
            raise ValueError(f"block_size must be >= 1, not {self.block_size}")
        if self.retries < 0:
            raise ValueError(f"retries must be >= 0, not {self.retries}")


def parse_config(options: dict[str, Any] | None) -> GptqConfig:
    """``GptqConfig`` from ``plugin_options["gptq"]``: keys directly, or ``opt`` = KEY=VALUE list.

    ``enable`` (the CLI flag) is accepted and ignored here.
    """
    opts = dict(options or {})
    opts.pop("enable", None)
    pairs = opts.pop("opt", ()) or ()
    if isinstance(pairs, str):
        pairs = (pairs,)
    for pair in pairs:
        key, sep, value = str(pair).partition("=")
        if not sep or not key.strip():
            raise UsageError(
                f"--gptq-opt {pair!r} is not KEY=VALUE", "write it as --gptq-opt damp=0.01"
            )
        opts[key.strip()] = value.strip()
    return parse_options(GptqConfig, opts, "plugin 'gptq'")


# --------------------------------------------------------------------------- Hessians


class HessianCollector:
    """Accumulates ``X^T X`` of a layer's inputs (a collector: ``update(x)``).

    ``x`` is the module's first positional input. ``kind`` says how it becomes rows of the
    weight's input dimension ``K``:

    * ``"linear"`` (``nn.Linear``, GPT-2 ``Conv1D``): ``x.reshape(-1, K)``;
    * ``"conv1d"`` / ``"conv2d"``: the patches ``F.unfold`` extracts (padding, stride, dilation
      and ``padding_mode`` as the layer applies them), one Hessian per convolution group.

    Rows holding NaN/Inf are not added (counted in ``nonfinite``). ``hessian()`` returns
    ``2 X^T X / rows`` (``[K, K]``, or ``[groups, K, K]`` for a grouped convolution).
    """

    def __init__(
        self,
        k: int,
        kind: str = "linear",
        module: torch.nn.Module | None = None,
        dtype: torch.dtype = torch.float32,
        on_alloc: Callable[[int], None] | None = None,
    ):
        self.k, self.kind, self.dtype = k, kind, dtype
        self.groups = getattr(module, "groups", 1) if kind != "linear" else 1
        self._conv = _conv_geometry(module) if kind != "linear" else None
        self.xtx: torch.Tensor | None = None
        self.rows = 0
        self.nonfinite = 0
        self._on_alloc = on_alloc

    @property
    def nbytes(self) -> int:
        return 0 if self.xtx is None else self.xtx.numel() * self.xtx.element_size()

    def update(self, x: torch.Tensor) -> None:
        rows = self._rows(x.detach())  # [groups, N, K]
        if not _finite(rows):  # the core feeds finite batches only; direct callers may not
            ok = torch.isfinite(rows).all(dim=-1).all(dim=0)
            self.nonfinite += int((~ok).sum())
            rows = rows[:, ok]
        if rows.shape[1] == 0:
            return
        if self.xtx is None:
            self.xtx = torch.zeros(self.groups, self.k, self.k, dtype=self.dtype, device=x.device)
            if self._on_alloc is not None:
                self._on_alloc(self.nbytes)
        rows = rows.to(self.dtype)
        self.xtx.baddbmm_(rows.transpose(1, 2), rows)
        self.rows += rows.shape[1]

    def hessian(self) -> torch.Tensor | None:
        """``2 X^T X / rows`` (None when no row was seen)."""
        if self.xtx is None or self.rows == 0:
            return None
        h = self.xtx * (2.0 / self.rows)
        return h[0] if self.groups == 1 else h

    def release(self) -> None:
        """Drop the accumulator (after the layer is quantized)."""
        if self.xtx is not None and self._on_alloc is not None:
            self._on_alloc(-self.nbytes)
        self.xtx = None

    def _rows(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "linear":
            return x.reshape(1, -1, self.k)
        geo = self._conv
        batched = x.dim() == (4 if self.kind == "conv2d" else 3)
        if not batched:
            x = x.unsqueeze(0)
        if geo["pad"] is not None:  # the layer's own padding (F.pad as nn.ConvNd applies it)
            x = F.pad(x, geo["pad"], mode=geo["mode"])
        if self.kind == "conv1d":
            x = x.unsqueeze(-2)  # [B, C, 1, L]: a 2-D convolution with a kernel of height 1
        cols = F.unfold(x, geo["kernel"], geo["dilation"], geo["padding"], geo["stride"])
        b, _, n = cols.shape  # [B, C_in * kh * kw, L]
        cols = cols.view(b, self.groups, self.k, n).permute(1, 0, 3, 2)
        return cols.reshape(self.groups, b * n, self.k)


def _conv_geometry(module: torch.nn.Module) -> dict[str, Any]:
    """unfold arguments reproducing ``module``'s convolution (as 2-D; Conv1d gets height 1)."""
    two_d = isinstance(module, torch.nn.Conv2d)

    def pair(v: Any) -> tuple[int, int]:
        v = tuple(v) if isinstance(v, (tuple, list)) else (v,)
        return (v[0], v[1]) if two_d else (1, v[0])

    kernel, dilation = pair(module.kernel_size), pair(module.dilation)
    pad, mode, padding = None, "constant", (0, 0)
    if module.padding_mode != "zeros":
        pad = tuple(module._reversed_padding_repeated_twice)
        mode = module.padding_mode
    elif isinstance(module.padding, str):
        if module.padding == "same":
            amounts: list[int] = []
            for d, k in zip(reversed(dilation), reversed(kernel)):
                total = d * (k - 1)
                amounts += [total // 2, total - total // 2]
            pad = tuple(amounts if two_d else amounts[:2])
    else:
        padding = pair(module.padding)
    return {
        "kernel": kernel,
        "dilation": dilation,
        "stride": pair(module.stride),
        "padding": padding,
        "pad": pad,
        "mode": mode,
    }


# --------------------------------------------------------------------------- the solver


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
    if not _finite(h):
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
        if int(info) == 0 and _finite(low.diagonal()) and bool((low.diagonal() > 0).all()):
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
    if not (_finite(dt) and _finite(wt)):
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


def _finite(t: torch.Tensor) -> bool:
    """NaN/Inf check without a tensor-sized temporary (amin/amax propagate NaN)."""
    return bool(torch.isfinite(torch.stack([t.amin(), t.amax()])).all())


# --------------------------------------------------------------------------- integration

_SCHEMES = {"int4-group", "int8"}
_COLLECTOR = "gptq.hessian"
_RUNS: dict[int, _Run] = {}  # per run, keyed by id(config); dropped by monoquant_unconfigure


class GptqWarning(UserWarning):
    """A layer was quantized without GPTQ (its reason is also in ``report.extra["gptq"]``)."""


@dataclass
class _Run:
    config: GptqConfig
    layers: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    live: int = 0
    peak: int = 0
    solver_peak: int = 0

    def alloc(self, nbytes: int) -> None:
        self.live += nbytes
        self.peak = max(self.peak, self.live)


def _options(config: Any) -> dict[str, Any] | None:
    """The gptq options of a run, or None when GPTQ is not enabled."""
    opts = (getattr(config, "plugin_options", None) or {}).get("gptq")
    if opts is None:
        return None
    enabled = opts.get("enable", True) or bool(opts.get("opt"))
    return dict(opts) if enabled else None


def _run(config: Any) -> _Run | None:
    run = _RUNS.get(id(config))
    if run is None:
        opts = _options(config)
        if opts is None:
            return None
        run = _RUNS[id(config)] = _Run(parse_config(opts))
    return run


def _kind(module: torch.nn.Module) -> tuple[str, int] | None:
    """``(kind, K)`` for the module types GPTQ handles, else None."""
    if isinstance(module, torch.nn.Linear):
        return "linear", module.in_features
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d)):
        k = math.prod(module.weight.shape[1:])
        return ("conv2d" if isinstance(module, torch.nn.Conv2d) else "conv1d"), k
    qual = f"{type(module).__module__}.{type(module).__qualname__}"
    if qual in ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D"):
        return "linear", module.weight.shape[0]
    return None


def _skip_reason(entry: Any, module: torch.nn.Module) -> str | None:
    if entry.scheme not in _SCHEMES:
        return f"scheme {entry.scheme!r}: GPTQ supports int4-group and int8"
    if _kind(module) is None:
        return f"{type(module).__name__}: GPTQ handles Linear, Conv1d/Conv2d and GPT-2 Conv1D"
    return None


@hookimpl
def monoquant_add_cli_options(group):
    group.add_option(
        "--gptq",
        "--gptq-enable",
        "gptq_enable",
        is_flag=True,
        help="Quantize int4-group / int8 weights with GPTQ (needs --calibration).",
    )
    group.add_option(
        "--gptq-opt",
        multiple=True,
        metavar="KEY=VALUE",
        help="GPTQ option (implies --gptq): damp, block_size, act_order, "
        "static_groups, grid, hessian_dtype, retries.",
    )


@hookimpl
def monoquant_modify_plan(plan, model, config):
    run = _run(config)
    if run is None:
        return
    if model is None:
        raise UsageError(
            "GPTQ needs a model to run calibration data through, and checkpoint mode (a file "
            "SOURCE) has none",
            "pass --model PKG.MODULE:FACTORY --weights FILE --calibration DATA instead of "
            "SOURCE, or drop --gptq",
        )
    for entry in plan.selected:
        why = _skip_reason(entry, model.get_submodule(entry.name))
        entry.notes.append(f"gptq: no ({why})" if why else "gptq")


@hookimpl
def monoquant_collectors(entry, module, config):
    run = _run(config)
    if run is None or _skip_reason(entry, module) is not None:
        return None
    kind, k = _kind(module)
    dtype = _DTYPES[run.config.hessian_dtype]
    return {_COLLECTOR: HessianCollector(k, kind, module, dtype, run.alloc)}


@hookimpl
def monoquant_quantize_module(entry, module, engine):
    run = _run(engine.config)
    if run is None:
        return None
    if entry.calibration_rows is None:
        raise UsageError(
            "GPTQ needs calibration data, and this run has none",
            "pass --calibration FILE (Python: Engine.quantize(..., calibration=batches)), "
            "or drop --gptq / plugin_options['gptq']",
        )
    why = _skip_reason(entry, module)
    col = entry.collected.get(_COLLECTOR)
    if why is None and col is None:
        why = "no Hessian was collected for this layer"
    if why is None:
        try:
            result, why = _quantize(entry, module, engine, run, col)
        finally:
            col.release()
        if result is not None:
            return result
    run.layers[entry.name] = {"method": "default", "reason": why}
    if not why.startswith("scheme") and _kind(module) is not None:
        warnings.warn(
            f"gptq: {entry.name or type(module).__name__}: {why}; quantized without GPTQ "
            f"({entry.scheme} with the {entry.observer} observer)",
            GptqWarning,
            stacklevel=2,
        )
    return None


def _quantize(entry, module, engine, run, col):
    """``(ModuleResult, None)``, or ``(None, reason)`` when the layer falls back."""
    from monoquant_core.engine import ModuleResult

    cfg = run.config
    hessian = col.hessian()
    if hessian is None:
        if col.nonfinite:
            return None, f"every calibration row ({col.nonfinite}) held NaN/Inf"
        return None, "saw no calibration data"
    replacer = engine.replacers.get(entry.replacer)
    scheme_cfg, obs_cfg = engine.component_configs(entry)
    reg_s = engine.schemes.entry(entry.scheme)
    scheme, obs_cls = reg_s.component, engine.observers.get(entry.observer)
    originals = replacer.weights(module)
    weight = originals["weight"].detach()
    axis = replacer.channel_axis(module, "weight")
    spec = scheme.spec(tuple(weight.shape), axis, scheme_cfg)
    if not _finite(weight):
        return None, "the weight holds NaN/Inf"
    moved = weight.movedim(axis, 0)
    wm = moved.reshape(moved.shape[0], -1).to(torch.float32)
    int4 = entry.scheme == "int4-group"
    grid_cfg = scheme_cfg
    if int4 and cfg.grid == "observer":
        grid_cfg = dataclasses.replace(scheme_cfg, method="rtn")

    def grid(cols: torch.Tensor) -> QParams:
        sp = scheme.spec(tuple(cols.shape), 0, grid_cfg)
        obs = obs_cls(sp, obs_cfg)
        obs.update(cols)
        qt = scheme.quantize(cols.contiguous(), obs.qparams(), sp, grid_cfg)
        z = None if qt.zero_point is None else qt.zero_point.to(torch.float32)
        return QParams(qt.scale.to(torch.float32), z)

    static = spec.group_size is None or cfg.act_order or cfg.static_groups
    params = grid(wm) if static else None
    shift = -spec.qmin if int4 else 0
    hs = hessian if hessian.dim() == 3 else hessian.unsqueeze(0)
    g, c = hs.shape[0], wm.shape[0]
    if hs.shape[-1] != wm.shape[1] or c % g:
        return None, f"the Hessian ({tuple(hs.shape)}) does not match the weight {tuple(wm.shape)}"
    rows = c // g
    ws, ss, zs, damps = [], [], [], []
    run.solver_peak = max(run.solver_peak, _solver_bytes(rows, hs.shape[-1]))
    for gi in range(g):
        sl = slice(gi * rows, (gi + 1) * rows)
        p = None
        if params is not None:
            p = params if params.scale.shape[0] == 1 else _rows(params, sl)
        res = gptq_solve(
            wm[sl],
            hs[gi],
            spec,
            grid=None if static else grid,
            params=p,
            block_size=cfg.block_size,
            damp=cfg.damp,
            act_order=cfg.act_order,
            retries=cfg.retries,
            code_shift=shift,
        )
        if res.fallback is not None:
            return None, res.fallback
        ws.append(res.weight)
        ss.append(res.params.scale)
        zs.append(res.params.zero_point)
        damps.append(res.damp)
    if params is None:
        params = QParams(torch.cat(ss), None if zs[0] is None else torch.cat(zs))
    wq = torch.cat(ws).reshape(moved.shape).movedim(0, axis)
    final_cfg = dataclasses.replace(scheme_cfg, method="rtn") if int4 else scheme_cfg
    qt = scheme.quantize(wq.contiguous(), params, spec, final_cfg)
    info = {
        "method": "gptq",
        "damp": max(damps),
        "rows": col.rows,
        "act_order": cfg.act_order,
        "static_groups": bool(static and spec.group_size is not None),
        "hessian_bytes": col.nbytes,
    }
    qt.meta = {
        "plugin": reg_s.plugin,
        "layout": "affine",
        "scheme_config": config_to_dict(scheme_cfg),
        "observer": entry.observer,
        "observer_config": config_to_dict(obs_cfg),
        **qt.meta,
        "gptq": {k: v for k, v in info.items() if k in ("damp", "rows", "act_order")},
    }
    others = {p: w for p, w in originals.items() if p != "weight"}
    qweights = {"weight": qt, **engine.quantize_entry_weights(entry, module, others)}
    new = replacer.replace(module, qweights, engine.backends.get(entry.backend), scheme)
    run.layers[entry.name] = info
    return ModuleResult(entry=entry, module=new, qtensors=qweights, originals=originals), None


def _rows(p: QParams, sl: slice) -> QParams:
    return QParams(p.scale[sl], None if p.zero_point is None else p.zero_point[sl])


def _solver_bytes(c: int, k: int) -> int:
    """float32 working set of one solve: reversed H, its factor, R, and two [K, C] buffers."""
    return 4 * (3 * k * k + 2 * k * c)


@hookimpl
def monoquant_report(report, config):
    run = _RUNS.get(id(config))
    if run is None:
        return
    report.extra["gptq"] = {
        "config": {k: v for k, v in config_to_dict(run.config).items() if k != "version"},
        "layers": run.layers,
        "hessian_peak_bytes": run.peak,
        "solver_peak_bytes": run.solver_peak,
    }


@hookimpl
def monoquant_unconfigure(config):
    run = _RUNS.pop(id(config), None)
    if run is not None:
        run.layers = {}
