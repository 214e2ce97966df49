"""Run-time activation quantizers: the contracts of ``activations="dynamic"``,
``"dynamic-tensor"`` and ``"static"`` that every backend follows."""

from __future__ import annotations

import math

import torch

from .qtensor import QTensor

__all__ = [
    "fake_quantize_static",
    "quantize_per_tensor_asym",
    "quantize_per_token",
    "static_act_params",
]


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 codes of a 2-D ``x`` with one scale per row: ``(codes, scale [M, 1])``.

    ``scale = max|x_row| / 127`` (1 for an all-zero row), codes in ``-127..127``; this is the
    ``activations="dynamic"`` contract every backend follows (the reference backend computes
    ``F.linear(codes * scale, W)``).
    """
    amax = x.abs().amax(dim=1, keepdim=True).to(torch.float32)
    scale = torch.where(amax > 0, amax / 127.0, torch.ones_like(amax))
    codes = torch.round(x.to(torch.float32) / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def quantize_per_tensor_asym(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Asymmetric uint8 codes of ``x`` with one scale and zero point for the whole tensor.

    The range is widened to include 0, ``scale = (max - min) / 255`` and ``zero = round(-min /
    scale)``: the ``activations="dynamic-tensor"`` contract (what fbgemm's dynamic linear does).
    """
    lo = min(float(x.min()), 0.0)
    hi = max(float(x.max()), 0.0)
    scale = (hi - lo) / 255.0 if hi > lo else 1.0
    zero = round(-lo / scale)
    codes = torch.round(x.to(torch.float32) / scale + zero).clamp_(0, 255).to(torch.uint8)
    return codes, scale, zero


def fake_quantize_static(x: torch.Tensor, qt: QTensor) -> torch.Tensor:
    """``x`` through the calibrated uint8 activation quantizer of a static ``qt`` (float32).

    ``codes = clamp(round(x / act_scale) + act_zero_point, 0, 255)``, back as ``(codes -
    act_zero_point) * act_scale``: the ``activations="static"`` contract every backend follows.

    Raises:
        ValueError: ``qt`` has no ``act_scale`` / ``act_zero_point`` extras.
    """
    scale, zero = static_act_params(qt)
    codes = (torch.round(x.to(torch.float32) / scale) + zero).clamp_(0, 255)
    return (codes - zero) * scale


def static_act_params(qt: QTensor) -> tuple[float, int]:
    """``(act_scale, act_zero_point)`` of a static ``qt``; ValueError when missing/invalid."""
    s, z = qt.extra.get("act_scale"), qt.extra.get("act_zero_point")
    if s is None or z is None or s.numel() != 1 or z.numel() != 1:
        raise ValueError(
            "int8 weight with activations='static' lacks its act_scale / act_zero_point "
            "(quantize it with calibration data)"
        )
    scale, zero = float(s.reshape(())), int(z.reshape(()))
    if not (math.isfinite(scale) and scale > 0 and 0 <= zero <= 255):
        raise ValueError(f"invalid static activation parameters scale={scale}, zero={zero}")
    return scale, zero
