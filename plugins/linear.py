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

    Gradients reach the input (and a bias made trainable) on every backend, as through
    ``F.linear`` with the dequantized weight (:class:`_BackendLinear`); the quantized weight
    itself is frozen.
    """

    def __init__(self, in_features, out_features, qweight, bias, backend, scheme):
        super().__init__(backend, scheme)
        self.in_features = in_features
        self.out_features = out_features
        self.set_qtensor("weight", qweight)
        self.set_bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if "float_cols" not in self._qmeta["weight"]["roles"]:
            return self._backend_linear(x)
        # Mixed precision: float input columns in floating point, the rest on the backend
        # (whose run-time activation quantization then never sees those columns).
        cols = self.weight_float_cols
        y = self._backend_linear(x.index_fill(-1, cols, 0))
        return y + F.linear(x.index_select(-1, cols), self.weight_float_values.to(x.dtype))

    def _backend_linear(self, x: torch.Tensor) -> torch.Tensor:
        bias = self._parameters["bias"]  # = self.bias, without nn.Module.__getattr__ (0.4 us)
        if (x.requires_grad or (bias is not None and bias.requires_grad)) and (
            torch.is_grad_enabled()
        ):
            return _BackendLinear.apply(x, bias, self)
        return self.backend.linear(x, self.prepared("weight"), bias)

    def _derive(self, param: str):
        """The backend's form of the integer part (float columns are computed here)."""
        return self.backend.prepare(self.qtensor(param).without_float_columns(), self.scheme)

    def extra_repr(self) -> str:
        qt = self._qmeta["weight"]
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, scheme={qt['scheme']}, bits={qt['bits']}, "
            f"group_size={qt['group_size']}, backend={self.backend.name}"
        )


class _BackendLinear(torch.autograd.Function):
    """The backend's ``linear`` forward, with the gradient of ``F.linear`` with the
    dequantized weight (the backend's :meth:`~monoquant_core.Backend.weight`) for every
    backend: no kernel of ``torch-cpu`` / ``cpu-vnni`` / fbgemm has a derivative of its own.
    Run-time activation quantization passes the gradient straight through (it is treated as
    the identity); the quantized weight is a buffer and gets none."""

    @staticmethod
    def forward(ctx, x, bias, module):
        ctx.module = module
        ctx.bias_dtype = None if bias is None else bias.dtype
        return module.backend.linear(x, module.prepared("weight"), bias)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        m = ctx.module
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            qt = m.qtensor("weight").without_float_columns()
            w = m.backend.weight(qt, m.scheme, grad.dtype).to(grad.device)
            grad_x = grad @ w
        if ctx.needs_input_grad[1]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0).to(ctx.bias_dtype)
        return grad_x, grad_bias, None


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
