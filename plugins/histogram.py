"""``histogram`` observer: the clipping range that minimises the expected quantization error.

Two modes, chosen by the spec's granularity:

* **per-tensor** (activations, per-tensor weights): accumulate a histogram over every update and
  pick ``[lo, hi]`` minimising the squared error of quantizing the histogram's mass (bin centres
  weighted by counts), searched over a grid of candidate pairs
  in one vectorised pass. The raw ``[min, max]`` is a candidate, so under this error model the
  result is never worse than ``minmax``.
* **per-channel / group-wise** (weights): on the exact values, try ``grid`` shrink ratios
  ``p`` in ``[1 - max_shrink, 1]`` of each group's range (``[p*min, p*max]``) and keep, per
  group, the one with the least squared error after rounding the parameters to the dtype they
  are stored in. All groups are searched at once, in row blocks (no Python loop over groups);
  ``p = 1`` is plain minmax, so no group ever gets worse.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from monoquant_core import Capabilities, ComponentConfig, Observer, QParams, UsageError, hookimpl
from monoquant_core.affine import Scratch, minmax_qparams, round_params, rounding_error
from monoquant_core.layout import to_groups

_BLOCK_ELEMS = 1 << 19  # rows per block so a block's temporaries stay in cache
_TENSOR_GRID = 32  # candidates per side in per-tensor mode (32 x 32 pairs)
_HISTC_SPAN = 1e37  # wider ranges are binned in float64 (their width overflows float32)


@dataclass(frozen=True)
class HistogramConfig(ComponentConfig):
    """Options of the ``histogram`` observer.

    Attributes:
        bins: histogram bins (per-tensor mode; candidates there are 32 values per side on a
            quadratic grid from the raw extreme down to 1% of it).
        grid: number of candidate shrink ratios (group / per-channel mode).
        max_shrink: smallest ratio tried is ``1 - max_shrink`` (group / per-channel mode).
    """

    bins: int = 2048
    grid: int = 10
    max_shrink: float = 0.2

    def __post_init__(self) -> None:
        if self.bins < 16:
            raise ValueError(f"bins must be >= 16, got {self.bins}")
        if self.grid < 1:
            raise ValueError(f"grid must be >= 1, got {self.grid}")
        if not 0.0 <= self.max_shrink < 1.0:
            raise ValueError(f"max_shrink must be in [0, 1), got {self.max_shrink}")


class HistogramObserver(Observer):
    """MSE-optimal clipping: a histogram search per tensor, an exact search per group."""

    name = "histogram"
    config_class = HistogramConfig
    capabilities = Capabilities(granularities=("per-tensor", "per-channel", "group"))

    def __init__(self, spec, config=None):
        super().__init__(spec, config)
        self.groups: list[torch.Tensor] = []
        self.hist: torch.Tensor | None = None
        self.lo = self.hi = 0.0

    # ----------------------------------------------------------------- collection

    def update(self, x: torch.Tensor) -> None:
        x = x.detach()
        if self.spec.axis is not None:
            self.groups.append(to_groups(x, self.spec.axis, self.spec.group_size))
            return
        x = x.reshape(-1).to(torch.float32)
        if x.numel() == 0:
            return
        lo, hi = x.min().item(), x.max().item()
        if self.hist is None:
            self.lo, self.hi = lo, hi
            self.hist = torch.zeros(self.config.bins, dtype=torch.float64)
        elif lo < self.lo or hi > self.hi:
            self._rebin(min(lo, self.lo), max(hi, self.hi))
        self.hist += self._histc(x)

    def _histc(self, x: torch.Tensor) -> torch.Tensor:
        if self.hi <= self.lo:
            h = torch.zeros(self.config.bins, dtype=torch.float64)
            h[0] = x.numel()
            return h
        if self.hi - self.lo > _HISTC_SPAN:  # float32 histc drops every count of such a range
            x = x.to(torch.float64)
        return torch.histc(x, self.config.bins, self.lo, self.hi).to(torch.float64)

    def _rebin(self, lo: float, hi: float) -> None:
        """Move the counts to a wider range (mass placed at old bin centres)."""
        old = self.hist
        n = self.config.bins
        width = (self.hi - self.lo) / n
        centres = self.lo + width * (torch.arange(n, dtype=torch.float64) + 0.5)
        idx = ((centres - lo) / (hi - lo) * n).floor().clamp(0, n - 1).long()
        self.hist = torch.zeros(n, dtype=torch.float64).index_add_(0, idx, old)
        self.lo, self.hi = lo, hi

    # ----------------------------------------------------------------- parameters

    def qparams(self) -> QParams:
        if self.spec.axis is not None:
            if not self.groups:
                raise UsageError("the histogram observer saw no data", "call update() first")
            g = torch.cat(self.groups, dim=-1) if len(self.groups) > 1 else self.groups[0]
            return search_groups(g, self.spec, self.config.grid, self.config.max_shrink)
        if self.hist is None:
            raise UsageError("the histogram observer saw no data", "call update() first")
        lo, hi = self._search_histogram()
        t = torch.tensor([[lo]], dtype=torch.float32), torch.tensor([[hi]], dtype=torch.float32)
        return minmax_qparams(t[0], t[1], self.spec)

    def _search_histogram(self) -> tuple[float, float]:
        n = self.config.bins
        if self.hi <= self.lo:
            return self.lo, self.hi
        width = (self.hi - self.lo) / n
        centres = self.lo + width * (torch.arange(n, dtype=torch.float64) + 0.5)
        counts = self.hist
        # Candidate extremes: a quadratic grid from the raw extreme inwards, down to 1% of it
        # (activations can need far stronger clipping than weights).
        steps = torch.linspace(0.0, 1.0, _TENSOR_GRID, dtype=torch.float64) ** 2
        shrink = 0.99
        his = self.hi - steps * shrink * (self.hi - max(self.lo, 0.0))
        los = self.lo + steps * shrink * (min(self.hi, 0.0) - self.lo)
        if self.spec.symmetric:
            amax = max(-self.lo, self.hi)
            his = amax * (1 - steps * shrink)
            los = -his
            pairs_lo, pairs_hi = los, his
        else:
            pairs_lo = los.repeat_interleave(len(his))
            pairs_hi = his.repeat(len(los))
        qp = minmax_qparams(pairs_lo.unsqueeze(-1), pairs_hi.unsqueeze(-1), self.spec)
        qp = round_params(qp, self.spec.param_dtype)
        scale = qp.scale.double()
        zero = None if qp.zero_point is None else qp.zero_point.double()
        q = centres / scale
        if zero is not None:
            q = q + zero
        q = q.round().clamp(self.spec.qmin, self.spec.qmax)
        rec = (q - zero) * scale if zero is not None else q * scale
        err = ((rec - centres) ** 2 * counts).sum(-1)
        best = int(torch.argmin(err))  # ties -> the first candidate, the raw range
        return float(pairs_lo[best]), float(pairs_hi[best])


def search_groups(g: torch.Tensor, spec, grid: int, max_shrink: float) -> QParams:
    """Per-group MSE clip search on exact values; returns float32 ``[C, G]`` params.

    Vectorised over every group of a row block; ratios ``p = 1, ..., 1 - max_shrink``.
    """
    c, ng, s = g.shape
    rows = max(1, _BLOCK_ELEMS // max(ng * s, 1))
    scales = torch.empty(c, ng, dtype=torch.float32)
    zeros = None if spec.symmetric else torch.empty(c, ng, dtype=torch.float32)
    ratios = torch.linspace(1.0, 1.0 - max_shrink, grid) if grid > 1 else torch.ones(1)
    scratch = Scratch()
    for r0 in range(0, c, rows):
        x = g[r0 : r0 + rows].to(torch.float32)
        lo, hi = x.amin(-1), x.amax(-1)
        # plain minmax until a candidate has a smaller, finite error (a group whose error
        # overflows float32, values near its limit, keeps minmax's always-valid parameters)
        base = minmax_qparams(lo, hi, spec)
        best_err = torch.full(lo.shape, float("inf"))
        best_s = base.scale
        best_z = base.zero_point
        for p in ratios.tolist():
            qp = round_params(minmax_qparams(lo * p, hi * p, spec), spec.param_dtype)
            err = rounding_error(x, qp, spec, scratch)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best_s = torch.where(better, qp.scale, best_s)
            if best_z is not None:
                best_z = torch.where(better, qp.zero_point, best_z)
        scales[r0 : r0 + rows] = best_s
        if zeros is not None:
            zeros[r0 : r0 + rows] = best_z
    return QParams(scales, zeros)


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "histogram"


@hookimpl
def monoquant_register_observers(register):
    register(HistogramObserver)
