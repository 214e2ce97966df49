"""``conv`` replacer: ``nn.Conv1d`` / ``nn.Conv2d`` -> :class:`QuantizedConv1d` / ``2d``.

Weights ``[out, in / groups, *kernel]`` are quantized per output channel (axis 0); the
canonical layout flattens the other dims, so grouped and depthwise convolutions need nothing
special. The quantized modules keep every attribute of the original (stride, padding including
``"same"``/``"valid"``, dilation, groups, ``padding_mode`` including ``reflect``/``replicate``/
``circular``) and its float bias, and compute exactly like ``nn.Conv*d._conv_forward`` with
the backend's float weight (``Backend.weight``) in the input dtype.

A subclass that overrides ``forward`` (e.g. a "same"-padding or weight-standardised conv) is
kept in float: replacing it would silently drop its own computation.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from monoquant_core import QuantizedModule, Replacer, hookimpl

_ATTRS = (
    "in_channels",
    "out_channels",
    "kernel_size",
    "stride",
    "padding",
    "dilation",
    "groups",
    "padding_mode",
    "_reversed_padding_repeated_twice",
)


class _QuantizedConv(QuantizedModule):
    """Common body of the quantized convolutions (``_conv`` is ``F.conv1d`` / ``F.conv2d``)."""

    _conv: ClassVar[Any]

    def __init__(self, conv: nn.Module, qweight, backend, scheme):
        super().__init__(backend, scheme)
        for attr in _ATTRS:
            value = getattr(conv, attr)
            setattr(self, attr, list(value) if isinstance(value, list) else value)
        self.set_qtensor("weight", qweight)
        self.set_bias(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.backend.weight(self.qtensor("weight"), self.scheme, x.dtype)
        b = None if self.bias is None else self.bias.to(x.dtype)
        padding = self.padding
        if self.padding_mode != "zeros":
            x = F.pad(x, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            padding = (0,) * len(self.kernel_size)
        return type(self)._conv(x, w, b, self.stride, padding, self.dilation, self.groups)

    def extra_repr(self) -> str:
        qt = self._qmeta["weight"]
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}"
        s += f", stride={self.stride}"
        if isinstance(self.padding, str):
            s += f", padding={self.padding!r}"
        elif any(self.padding):
            s += f", padding={self.padding}"
        if any(d != 1 for d in self.dilation):
            s += f", dilation={self.dilation}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return (
            f"{s}, bias={self.bias is not None}, scheme={qt['scheme']}, bits={qt['bits']}, "
            f"group_size={qt['group_size']}, backend={self.backend.name}"
        )


class QuantizedConv1d(_QuantizedConv):
    """Drop-in ``nn.Conv1d`` with a quantized weight; output dtype = input dtype."""

    _conv = staticmethod(F.conv1d)


class QuantizedConv2d(_QuantizedConv):
    """Drop-in ``nn.Conv2d`` with a quantized weight; output dtype = input dtype."""

    _conv = staticmethod(F.conv2d)


_QUANTIZED: dict[type, type[_QuantizedConv]] = {
    nn.Conv1d: QuantizedConv1d,
    nn.Conv2d: QuantizedConv2d,
}


def _base(module: nn.Module) -> type:
    return next(cls for cls in type(module).__mro__ if cls in _QUANTIZED)


class ConvReplacer(Replacer):
    """Replaces ``nn.Conv1d`` / ``nn.Conv2d`` (channel axis 0, per output channel)."""

    name = "conv"
    module_types = (nn.Conv1d, nn.Conv2d)

    def skip_reason(self, name, module, model):
        base = _base(module)
        cls = type(module)
        if cls.forward is not base.forward or cls._conv_forward is not base._conv_forward:
            return (
                f"{cls.__name__} overrides the forward of {base.__name__}; kept in float so "
                "its own computation is preserved"
            )
        return None

    def replace(self, module, qweights, backend, scheme):
        return _QUANTIZED[_base(module)](module, qweights["weight"], backend, scheme)


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "conv"


@hookimpl
def monoquant_register_replacers(register):
    register(ConvReplacer())
