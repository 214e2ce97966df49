"""``reference`` backend: dequantize, then ``F.linear``. Pure PyTorch, any device.

It is the ground truth every other backend is tested against: exact dequantization of the
stored codes in float32, cast to the input dtype.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from monoquant_core import Backend, Capabilities, FormatError, Kernel, hookimpl
from monoquant_core.activations import (
    fake_quantize_static,
    quantize_per_tensor_asym,
    quantize_per_token,
    static_act_params,
)


class ReferenceBackend(Backend):
    name = "reference"
    device_types = ("cpu", "cuda", "mps", "xpu")
    priority = 0
    capabilities = Capabilities(
        numerics="dequantizes the weight in float32 on every call, then F.linear in the "
        "input dtype (exact; slow); with activations='dynamic' the inputs are first "
        "quantized per token to int8 and dequantized (the W8A8 ground truth); with "
        "activations='static' through the calibrated uint8 act_scale / act_zero_point",
    )

    def kernels(self, info):
        return (Kernel("float32 dequantize + F.linear"),)

    def expected_speedup(self, info, rows):
        # dequantizes the whole weight on every call: 0.1x float at one row, at most 0.5x at
        # hundreds (bench/kernels.py, reference rows)
        return 0.1 if rows < 32 else 0.4

    def prepare(self, qt, scheme):
        if qt.activations == "static":
            try:
                static_act_params(qt)
            except ValueError as e:
                raise FormatError(str(e), "quantize it again with calibration data") from None
        return (qt, scheme)

    def linear(self, x, prepared, bias):
        qt, scheme = prepared
        w = scheme.dequantize(qt).to(device=x.device, dtype=x.dtype)
        b = None if bias is None else bias.to(dtype=x.dtype)
        if qt.activations == "dynamic" and x.numel():
            codes, scale = quantize_per_token(x.reshape(-1, x.shape[-1]))
            x = (codes.to(torch.float32) * scale).to(x.dtype).reshape(x.shape)
        elif qt.activations == "dynamic-tensor" and x.numel():
            codes, s, z = quantize_per_tensor_asym(x)
            x = ((codes.to(torch.float32) - z) * s).to(x.dtype)
        elif qt.activations == "static":
            x = fake_quantize_static(x, qt).to(x.dtype)
        return F.linear(x, w, b)


#: this plugin's name, whatever the loading path (entry point or object)
monoquant_plugin_name = "reference"


@hookimpl
def monoquant_register_backends(register):
    register(ReferenceBackend())
