"""The core's essential plugin: the default ``monoquant_quantize_module`` (observe -> quantize
-> replace). Registered by every Engine under the name ``core``; it runs ``trylast`` so any
plugin can take over a module first, or wrap this one with ``wrapper=True``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from torch import nn

from . import hookimpl

if TYPE_CHECKING:  # pragma: no cover
    from .engine import Engine, ModuleResult
    from .plan import PlanEntry


@hookimpl(trylast=True)
def monoquant_quantize_module(entry: PlanEntry, module: nn.Module, engine: Engine) -> ModuleResult:
    from .engine import ModuleResult

    replacer = engine.replacers.get(entry.replacer)
    originals = replacer.weights(module)
    qweights = engine.quantize_entry_weights(entry, module, originals)
    new = replacer.replace(
        module, qweights, engine.backends.get(entry.backend), engine.schemes.get(entry.scheme)
    )
    return ModuleResult(entry=entry, module=new, qtensors=qweights, originals=originals)
