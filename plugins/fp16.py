"""``fp16`` and ``bf16`` schemes: a plain cast of the weight to float16 / bfloat16.

Stored in the canonical layout as 16-bit "codes": ``qdata`` is the cast weight viewed as
``[1, numel]`` (per-tensor, no groups), ``scale`` is a single ``1.0`` and there is no zero point,
so ``QTensor.dequantize()`` gives the cast values back exactly.

The observer's parameters are ignored: a cast has none, so any observer works (the default,
``minmax``, costs one pass over the weight).

``fp16`` keeps 10 mantissa bits but only reaches ``|w| <= 65504``; a weight beyond that is
refused (it would silently become ``inf``), with ``bf16`` as the fix: it keeps float32's range
with 7 mantissa bits. Values below float16's subnormal range (``~6e-8``) flush to zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from monoquant_core import (
    Capabilities,
    ComponentConfig,
    QTensor,
    QuantSpec,
    Scheme,
    UsageError,
    hookimpl,
)


@dataclass(frozen=True)
class CastConfig(ComponentConfig):
    """Options of the ``fp16`` / ``bf16`` schemes: none (a cast has nothing to tune)."""


class _CastScheme(Scheme):
    """Cast to ``target``; the subclasses only name the dtype and the fix for an overflow."""

    target: ClassVar[torch.dtype]
    overflow_fix: ClassVar[str]
    config_class = CastConfig
    capabilities = Capabilities(
        bits=(16,),
        group_sizes=(None,),
        symmetric=(True,),
        granularities=("per-tensor",),
    )
    default_observer = "minmax"

    def spec(self, shape, axis, config):
        return QuantSpec(bits=16, symmetric=True, axis=None)

    def quantize(self, weight, qparams, spec, config):
        """Cast ``weight``; ``qparams`` (the observer's) are ignored.

        Raises:
            UsageError: a value lies beyond the largest finite value of the target dtype.
        """
        w = weight.detach()
        limit = torch.finfo(self.target).max
        amax = w.abs().amax().item() if w.numel() else 0.0
        if amax > limit:
            name = str(self.target).replace("torch.", "")
            raise UsageError(
                f"values exceed {name} range (a weight of shape {tuple(w.shape)} has max "
                f"|w| = {amax:.6g} > {limit:.6g}); casting would turn them into inf",
                self.overflow_fix,
            )
        return QTensor(
            qdata=w.to(self.target).reshape(1, -1).contiguous(),
            scale=torch.ones(1, 1, dtype=torch.float32, device=w.device),
            zero_point=None,
            bits=16,
            group_size=None,
            axis=None,
            shape=tuple(w.shape),
            dtype=w.dtype,
            scheme=self.name,
        )


class Fp16Scheme(_CastScheme):
    """IEEE half precision: 10 mantissa bits, ``|w| <= 65504``."""

    name = "fp16"
    target = torch.float16
    overflow_fix = "use --scheme bf16 (float32's range), or --skip the layer"


class Bf16Scheme(_CastScheme):
    """bfloat16: float32's exponent range with 7 mantissa bits."""

    name = "bf16"
    target = torch.bfloat16
    overflow_fix = "keep the layer in float with --skip"


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "fp16"


@hookimpl
def monoquant_register_schemes(register):
    register(Fp16Scheme())
    register(Bf16Scheme())
