"""The error hierarchy.

Every error a user can cause is a :class:`MonoQuantError`: it carries a ``problem`` and a
``fix`` and renders as one line ``problem: ... fix: ...``. The CLI prints that line and exits
non-zero; Python callers can catch the subclass they care about.
"""

from __future__ import annotations

__all__ = [
    "CapabilityError",
    "FormatError",
    "MonoQuantError",
    "PluginConflictError",
    "PluginError",
    "PluginLoadError",
    "PluginLoadWarning",
    "UsageError",
    "WeightNotRepresentable",
]


class MonoQuantError(Exception):
    """Base class of every error Mono Quant raises on purpose.

    Args:
        problem: what is wrong, naming the offending value.
        fix: what the user can do about it.
    """

    def __init__(self, problem: str, fix: str | None = None):
        self.problem = " ".join(str(problem).split())
        self.fix = " ".join(str(fix).split()) if fix else None
        super().__init__(self.problem)

    def __str__(self) -> str:
        if self.fix:
            return f"problem: {self.problem} fix: {self.fix}"
        return f"problem: {self.problem}"


class UsageError(MonoQuantError):
    """A bad argument: unknown component name, bad option, bad path, ..."""


class WeightNotRepresentable(UsageError):
    """A weight a scheme cannot store: parameters that are not finite, or codes that
    dequantize to inf. A scheme may raise it from :meth:`Scheme.quantize`; the core raises it
    when it checks a result (every QTensor, whoever computed it). Module mode keeps such a
    layer in float, with the problem as its skip reason in the plan and the report.
    """


class PluginLoadError(MonoQuantError):
    """A plugin could not be imported or registered (fatal only in strict mode)."""


class PluginConflictError(MonoQuantError):
    """Two plugins registered the same component name."""


class CapabilityError(MonoQuantError):
    """A component was asked for something it does not support (found at plan time)."""


class FormatError(MonoQuantError):
    """A file is not a valid Mono Quant / safetensors file, or cannot be loaded here."""


class PluginError(MonoQuantError):
    """An unexpected exception inside a plugin, re-raised with the plugin's name attached."""


class PluginLoadWarning(UserWarning):
    """Warning category for plugins that failed to load (the tool keeps working)."""
