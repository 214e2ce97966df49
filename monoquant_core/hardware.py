"""What this machine offers: CPU instruction set, quantized engines, GPUs, and which backends
run here (``monoquant env``)."""

from __future__ import annotations

import dataclasses
import platform
import typing
from typing import Any

import torch

from .components import WeightInfo
from .registry import Registries, safe_available
from .version import __version__

#: the weight ``monoquant env`` shows kernel choices for (a 4096 x 4096 Linear)
SHOWCASE_SHAPE = (4096, 4096)

__all__ = ["ISA_FLAGS", "cpu_features", "environment", "has_bf16_compute", "isa"]


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
                "kernels": _kernels(registries, be) if ok is True else {},
            }
        )
    return {
        "monoquant": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "isa": isa() or ["unknown"],
        "threads": torch.get_num_threads(),
        "quantized_engines": list(torch.backends.quantized.supported_engines),
        "cuda": f"yes ({torch.version.cuda})" if cuda else "no",
        "gpus": gpus or ["none"],
        "backends": backends,
    }


def _kernels(registries: Registries, backend: Any) -> dict[str, list[str]]:
    """``"int8 activations=dynamic" -> ["M 1-31: ...", ...]`` for a 4096 x 4096 weight of
    every scheme (and activation mode) the backend is meant for and supports."""
    out: dict[str, list[str]] = {}
    device = backend.device_types[0]
    for reg in registries.schemes:
        scheme = reg.component
        base = scheme.config_class()
        modes = ["none"]
        if dataclasses.is_dataclass(base) and hasattr(base, "activations"):
            hint = typing.get_type_hints(type(base)).get("activations")
            modes = [str(a) for a in typing.get_args(hint)] or [base.activations]
        for mode in modes:
            cfg = (
                dataclasses.replace(base, activations=mode)
                if hasattr(base, "activations")
                else base
            )
            try:
                spec = scheme.spec(SHOWCASE_SHAPE, 0, cfg)
            except Exception:  # a scheme that cannot describe this weight: nothing to show
                continue
            info = WeightInfo(reg.name, spec, SHOWCASE_SHAPE, torch.float32, device, mode)
            if not backend.capabilities.meant_for(reg.name, mode) or backend.supports(info):
                continue
            label = reg.name + ("" if mode == "none" else f" activations={mode}")
            out[label] = [k.describe() for k in backend.kernels(info)]
    return out


_FEATURES: frozenset[str] | None = None

#: CPU features that decide which kernels are fast, as ``monoquant env`` and the benchmarks
#: print them (/proc/cpuinfo flag -> name)
ISA_FLAGS = {
    "avx2": "AVX2",
    "avx512f": "AVX512",
    "avx512_vnni": "AVX512-VNNI",
    "avx_vnni": "AVX-VNNI",
    "avx512_bf16": "AVX512-BF16",
    "amx_bf16": "AMX-BF16",
    "amx_int8": "AMX-INT8",
}


def cpu_features() -> frozenset[str]:
    """The CPU's feature flags from ``/proc/cpuinfo`` (empty where it cannot be read)."""
    global _FEATURES  # a fact of this machine, read once: not run state
    if _FEATURES is None:
        flags: set[str] = set()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as f:
                for line in f:
                    if line.startswith("flags"):
                        flags = set(line.split(":", 1)[1].split())
                        break
        except OSError:
            pass
        _FEATURES = frozenset(flags)
    return _FEATURES


def isa() -> list[str]:
    """The kernel-relevant instruction-set extensions present (``["AVX2", "AVX512", ...]``)."""
    have = cpu_features()
    return [name for flag, name in ISA_FLAGS.items() if flag in have]


def has_bf16_compute() -> bool:
    """True when bfloat16 matrix products run natively (AVX512-BF16 or AMX)."""
    have = cpu_features()
    return "avx512_bf16" in have or "amx_bf16" in have
