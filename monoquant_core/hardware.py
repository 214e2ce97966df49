"""What this machine offers: CPU instruction set, quantized engines, GPUs, and which backends
run here (``monoquant env``)."""

from __future__ import annotations

import platform
from typing import Any

import torch

from .registry import Registries, safe_available
from .version import __version__

__all__ = ["environment"]


def environment(registries: Registries) -> dict[str, Any]:
    """Hardware and backend availability as data."""
    cuda = torch.cuda.is_available()
    gpus = []
    if cuda:
        for i in range(torch.cuda.device_count()):
            cap = torch.cuda.get_device_capability(i)
            gpus.append(f"{torch.cuda.get_device_name(i)} (sm_{cap[0]}{cap[1]})")
    backends = []
    for reg in sorted(registries.backends, key=lambda r: -r.component.priority):
        be = reg.component
        ok = safe_available(be)
        backends.append(
            {
                "name": reg.name,
                "plugin": reg.plugin,
                "priority": be.priority,
                "devices": list(be.device_types),
                "available": "yes" if ok is True else f"no: {ok}",
                "numerics": be.capabilities.numerics,
            }
        )
    return {
        "monoquant": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "cuda": f"yes ({torch.version.cuda})" if cuda else "no",
        "gpus": gpus or ["none"],
        "backends": backends,
    }
