"""Probes of what the installed fbgemm computes on this CPU (cached once per process)."""

from __future__ import annotations

import functools
import warnings

import torch

__all__ = ["fbgemm_reduce_range", "saturation_note"]


@functools.cache
def fbgemm_reduce_range() -> bool:
    """True where fbgemm's dynamic int8 linear saturates with 8-bit activation codes, so it
    must run with 7-bit ones (``reduce_range=True``, torch.ao's x86 default).

    Without VNNI (AVX2 CPUs), fbgemm multiplies uint8 activations by int8 weights with
    ``vpmaddubsw``, which adds each pair of products into a saturating int16: two products of
    255 x 127 overflow it (tests/plugins/test_torch_cpu.py saw a relative error of 0.077
    against the reference on an AVX2 CPU). With codes 0..127 no pair can overflow, at up to
    twice the activations' rounding step (within the tests' 3e-2 bound there). Probed once
    per process: codes 255 against weights 127 on every input, compared with the exact
    product."""
    k = 64
    with warnings.catch_warnings():  # torch deprecates qint8 tensors; the ops stay for now
        warnings.simplefilter("ignore", UserWarning)
        try:
            wq = torch.full((8, k), 127, dtype=torch.int8)
            scale = torch.full((8,), 1 / 127, dtype=torch.float64)
            qw = torch._make_per_channel_quantized_tensor(wq, scale, torch.zeros(8).long(), 0)
            packed = torch.ops.quantized.linear_prepack(qw, None)
            x = torch.ones(1, k)
            x[0, 0] = -1.0  # range [-1, 1]: every other input quantizes to code 255
            got = torch.ops.quantized.linear_dynamic(x, packed, False)
        except (AttributeError, RuntimeError):  # no fbgemm ops: nothing runs on them
            return False
    exact = float(x.sum())
    return not bool(torch.allclose(got, torch.full_like(got, exact), rtol=0.02, atol=0.05))


#: what fbgemm's int8 kernels do instead where their 8-bit input codes saturate
_SATURATED = {
    "int8-dynamic": " (7-bit input codes: 8-bit ones saturate fbgemm on this CPU)",
    "int8-dynamic-tensor": " (7-bit input codes: 8-bit ones saturate fbgemm on this CPU)",
    "int8-static": " (probed at prepare time; fbgemm saturates on this CPU: reference numerics)",
}


def saturation_note(kind: str) -> str:
    """What a kernel's description adds on a CPU where fbgemm saturates (else "")."""
    return _SATURATED.get(kind, "") if fbgemm_reduce_range() else ""
