"""``nf4``: 4-bit NormalFloat codes (QLoRA), one absmax scale per group of inputs.

The 16 levels are quantiles of the standard normal distribution scaled to [-1, 1], with an
exact zero (Dettmers et al., "QLoRA", 2023). Each group of ``group_size`` consecutive inputs
of a weight row is divided by its absolute maximum and every value becomes the index of the
nearest level. The codes are packed two per byte, low nibble first, like the canonical 4-bit
layout, and the absmax is stored as the ``scale``.

Dequantizing looks the codes up in the codebook: ``w = LEVELS[q] * scale``. That is not the
affine layout ``(q - zero_point) * scale``, so the scheme overrides ``dequantize`` and saved
files record ``"layout": "custom"``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

from monoquant_core import Capabilities, ComponentConfig, QTensor, QuantSpec, Scheme
from monoquant_core.affine import params_fit
from monoquant_core.layout import from_groups, pack_int4, to_groups, unpack_int4

#: the NF4 codebook of QLoRA (bitsandbytes), ascending.
LEVELS = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)
GROUP_SIZES = (32, 64, 128, 256)
_DTYPES = {"float16": torch.float16, "float32": torch.float32}


@dataclass(frozen=True)
class NF4Config(ComponentConfig):
    """Options of the ``nf4`` scheme.

    Attributes:
        group_size: inputs per absmax scale: 32, 64 (default, as in QLoRA), 128 or 256.
        scale_dtype: storage of the scales: ``float16`` (default; 4.25 bits per weight at
            g64) or ``float32``. A weight whose scales overflow float16 keeps float32.
    """

    group_size: int = 64
    scale_dtype: Literal["float16", "float32"] = "float16"


class NF4Scheme(Scheme):
    """4-bit NormalFloat weights with one absmax scale per group."""

    name = "nf4"
    config_class = NF4Config
    capabilities = Capabilities(
        bits=(4,),
        group_sizes=GROUP_SIZES,
        symmetric=(True,),
        granularities=("group",),
    )
    default_observer = "minmax"

    def validate_config(self, config: NF4Config) -> None:
        self.capabilities.require("scheme 'nf4'", "group_sizes", config.group_size)

    def check(self, shape, config):
        if len(shape) < 2:
            return f"{len(shape)}-D weight: group-wise quantization needs a matrix"
        return None

    def spec(self, shape, axis, config):
        return QuantSpec(bits=4, symmetric=True, axis=axis, group_size=config.group_size)

    def quantize(self, weight, qparams, spec, config):
        groups = to_groups(weight.to(torch.float32), spec.axis, spec.group_size)  # [C, G, S]
        absmax = qparams.scale * spec.qmax  # a symmetric observer gives scale = absmax / qmax
        dtype = _DTYPES[config.scale_dtype]
        if not params_fit(absmax, dtype):
            dtype = torch.float32
        scale = absmax.to(dtype)
        x = groups / scale.to(torch.float32).unsqueeze(-1)
        levels = torch.tensor(LEVELS)
        codes = torch.bucketize(x.clamp(-1.0, 1.0), (levels[1:] + levels[:-1]) / 2)
        return QTensor(
            qdata=pack_int4(codes.reshape(codes.shape[0], -1).to(torch.uint8)),
            scale=scale,
            zero_point=None,
            bits=4,
            group_size=spec.group_size,
            axis=spec.axis,
            shape=tuple(weight.shape),
            dtype=weight.dtype,
            scheme=self.name,
        )

    def dequantize(self, qt: QTensor) -> torch.Tensor:
        codes = unpack_int4(qt.qdata, qt.row_length, signed=False).long()
        levels = torch.tensor(LEVELS, device=codes.device)
        values = levels[codes].reshape(qt.channels, qt.scale.shape[-1], -1)
        w = values * qt.scale.to(torch.float32).unsqueeze(-1)
        return from_groups(w, qt.shape, qt.axis).to(qt.dtype)
