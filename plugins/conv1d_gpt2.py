"""``gpt2-conv1d`` replacer: Hugging Face's GPT-2 style ``Conv1D`` -> :class:`QuantizedGPT2Conv1D`.

That layer is a linear layer with a transposed weight: ``weight`` is ``[in, out]``, ``bias``
``[out]`` and ``y = addmm(bias, x.view(-1, in), weight).view(*x.shape[:-1], nf)``. It is
registered by qualified class name, so ``transformers`` is never imported by this plugin.

The weight is quantized per output channel: the channel axis is 1 of the stored ``[in, out]``
tensor. The QTensor keeps that shape (the canonical layout moves the channel axis to the front
internally, so group-wise schemes group along the inputs, and ``dequantize`` restores it), and
the quantized module computes with the backend's float ``[in, out]`` weight and ``torch.addmm``,
exactly like the original.
"""

from __future__ import annotations

import torch

from monoquant_core import QTensor, QuantizedModule, Replacer, hookimpl


class QuantizedGPT2Conv1D(QuantizedModule):
    """Drop-in GPT-2 ``Conv1D`` (weight ``[nx, nf]``) with a quantized weight.

    Keeps ``nf`` (outputs), ``nx`` (inputs) and the float ``bias``; output dtype = input dtype.
    """

    def __init__(self, nf: int, nx: int, qweight: QTensor, bias, backend, scheme):
        super().__init__(backend, scheme)
        self.nf = nf
        self.nx = nx
        self.set_qtensor("weight", qweight)
        self.set_bias(bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size_out = (*x.shape[:-1], self.nf)
        # contiguous [in, out] like the original parameter: same GEMM, bit-identical results
        w = self.backend.weight(self.qtensor("weight"), self.scheme, x.dtype).contiguous()
        flat = x.reshape(-1, x.shape[-1])
        y = flat @ w if self.bias is None else torch.addmm(self.bias.to(x.dtype), flat, w)
        return y.view(size_out)

    def extra_repr(self) -> str:
        qt = self._qmeta["weight"]
        return (
            f"nf={self.nf}, nx={self.nx}, bias={self.bias is not None}, "
            f"scheme={qt['scheme']}, bits={qt['bits']}, group_size={qt['group_size']}, "
            f"backend={self.backend.name}"
        )


class GPT2Conv1DReplacer(Replacer):
    """Replaces ``transformers``' ``Conv1D`` (weight ``[in, out]``, channel axis 1)."""

    name = "gpt2-conv1d"
    module_types = ("transformers.pytorch_utils.Conv1D", "transformers.modeling_utils.Conv1D")

    def channel_axis(self, module, param):
        return 1

    def replace(self, module, qweights, backend, scheme):
        qt = qweights["weight"]
        nx, nf = qt.shape
        return QuantizedGPT2Conv1D(
            getattr(module, "nf", nf), nx, qt, getattr(module, "bias", None), backend, scheme
        )


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "gpt2-conv1d"


@hookimpl
def monoquant_register_replacers(register):
    register(GPT2Conv1DReplacer())
