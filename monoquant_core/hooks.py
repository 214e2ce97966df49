"""Calling hooks so that a failure names the plugin that caused it.

Two ways, one rule for each kind of hook:

* :func:`call_each` calls every implementation of a hook one by one, in pluggy's order, and
  returns ``(plugin, result)`` pairs; an exception is re-raised as a
  :class:`~monoquant_core.errors.PluginError` naming exactly that plugin. Every lifecycle hook
  that is not ``firstresult`` is called this way, so those hooks take no wrappers (the host
  refuses one at registration).
* :func:`call_hook` calls a hook through pluggy (``firstresult`` hooks with wrappers:
  ``monoquant_quantize_weights``); an exception is attributed to the plugin whose hook function
  appears in its traceback.

A :class:`~monoquant_core.errors.MonoQuantError` raised by a plugin is already a one-line user
error and passes through unchanged.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import pluggy

from .errors import MonoQuantError, PluginError

__all__ = ["WRAPPABLE", "call_each", "call_hook", "plugin_error"]

#: the lifecycle hooks whose implementations may be ``wrapper=True`` / ``hookwrapper=True``
WRAPPABLE = frozenset({"monoquant_quantize_weights"})


def plugin_error(plugin: str | None, hook: str, exc: BaseException, where: str = "") -> PluginError:
    """The one-line error for an unexpected exception ``exc`` of ``plugin`` in ``hook``."""
    who = f"plugin {plugin!r}" if plugin else "a plugin"
    return PluginError(
        f"{who} raised {type(exc).__name__} in {hook}{where}: {exc}",
        "report it to the plugin's authors, or disable it with "
        f"MONOQUANT_DISABLE_PLUGINS={plugin or '<plugin name>'}",
    )


def call_each(
    pm: pluggy.PluginManager,
    hook: str,
    only_plugins: Collection[str] | None = None,
    **kwargs: Any,
) -> list[tuple[str, Any]]:
    """Call each implementation of ``hook`` in pluggy's order: ``[(plugin, result), ...]``;
    with ``only_plugins``, only those plugins' implementations.

    Implementations receive only the arguments they name, as with pluggy.
    """
    out = []
    for impl in reversed(getattr(pm.hook, hook).get_hookimpls()):
        if only_plugins is not None and impl.plugin_name not in only_plugins:
            continue
        try:
            res = impl.function(*[kwargs[a] for a in impl.argnames])
        except MonoQuantError:
            raise
        except Exception as e:
            raise plugin_error(impl.plugin_name, hook, e) from e
        out.append((impl.plugin_name, res))
    return out


def call_hook(
    pm: pluggy.PluginManager,
    hook: str,
    only_plugins: Collection[str] | None = None,
    **kwargs: Any,
) -> Any:
    """Call ``hook`` through pluggy (wrappers, ``firstresult``); failures name the plugin.
    With ``only_plugins``, only those plugins' implementations take part."""
    caller = getattr(pm.hook, hook)
    if only_plugins is not None:
        leave = [i.plugin for i in caller.get_hookimpls() if i.plugin_name not in only_plugins]
        caller = pm.subset_hook_caller(hook, leave)
    try:
        return caller(**kwargs)
    except MonoQuantError:
        raise
    except Exception as e:
        raise plugin_error(_culprit(pm, hook, e), hook, e) from e


def _culprit(pm: pluggy.PluginManager, hook: str, exc: Exception) -> str | None:
    """The plugin whose implementation of ``hook`` is innermost in ``exc``'s traceback."""
    codes = []
    tb = exc.__traceback__
    while tb is not None:
        codes.append(tb.tb_frame.f_code)
        tb = tb.tb_next
    impls = getattr(pm.hook, hook).get_hookimpls()
    for code in reversed(codes):
        for impl in impls:
            if getattr(impl.function, "__code__", None) is code:
                return impl.plugin_name
    return None
