"""The GPTQ Hessian collector: ``2 X^T X / rows`` of a layer's inputs, accumulated during
calibration (for Linear, GPT-2 ``Conv1D`` and ``Conv1d`` / ``Conv2d`` layers)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from monoquant_core.metrics import all_finite

__all__ = ["HessianCollector"]


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
        if not all_finite(rows):  # the core feeds finite batches only; direct callers may not
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
