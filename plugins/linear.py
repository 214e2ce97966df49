"""``linear`` replacer: ``nn.Linear`` (and subclasses) -> :class:`QuantizedLinear`."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from monoquant_core import QuantizedModule, Replacer, hookimpl


class QuantizedLinear(QuantizedModule):
    """Drop-in ``nn.Linear`` with a quantized weight, run by a backend.

    Keeps ``in_features`` / ``out_features`` and the float ``bias``; the output dtype is the
    input dtype. A weight with float columns (``float_cols`` / ``float_values``, see
    :mod:`monoquant_core.qtensor`) is computed as ``backend(x with those columns zeroed) +
    x[..., cols] @ float_values^T``: any backend runs the integer part.
    """

    def __init__(self, in_features, out_features, qweight, bias, backend, scheme):
        super().__init__(backend, scheme)
        self.in_features = in_features
        self.out_features = out_features
        self.set_qtensor("weight", qweight)
        self.set_bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "float_cols" not in self._qmeta["weight"]["roles"]:
            return self.backend.linear(x, self.prepared("weight"), self.bias)
        # Mixed precision: float input columns in floating point, the rest on the backend
        # (whose run-time activation quantization then never sees those columns).
        cols = self.weight_float_cols
        y = self.backend.linear(x.index_fill(-1, cols, 0), self.prepared("weight"), self.bias)
        return y + F.linear(x.index_select(-1, cols), self.weight_float_values.to(x.dtype))

    def prepared(self, param: str = "weight"):
        """The backend's form of the integer part (float columns are computed here)."""
        p = self._prepared.get(param)
        if p is None:
            qt = self.qtensor(param).without_float_columns()
            p = self._prepared[param] = self.backend.prepare(qt, self.scheme)
        return p

    def extra_repr(self) -> str:
        qt = self._qmeta["weight"]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={qt['scheme']}, bits={qt['bits']}, "
            f"group_size={qt['group_size']}, backend={self.backend.name}"
        )


class LinearReplacer(Replacer):
    """Replaces ``nn.Linear`` (weight ``[out, in]``, channel axis 0)."""

    name = "linear"
    module_types = (nn.Linear,)
    activations = ("none", "dynamic", "dynamic-tensor", "static")  # backend.linear honours them

    def skip_reason(self, name, module, model):
        parent_name = name.rpartition(".")[0]
        parent = model.get_submodule(parent_name) if name else None
        if isinstance(parent, nn.MultiheadAttention):
            return (
                "out_proj of nn.MultiheadAttention, which reads the weight tensor directly "
                "instead of calling the layer"
            )
        return None

    def replace(self, module, qweights, backend, scheme):
        return QuantizedLinear(
            module.in_features,
            module.out_features,
            qweights["weight"],
            module.bias,
            backend,
            scheme,
        )


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "linear"


@hookimpl
def monoquant_register_replacers(register):
    register(LinearReplacer())
