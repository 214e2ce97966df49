"""Component and plugin options: frozen dataclasses, parsed from Python values or CLI strings.

Each component declares a frozen dataclass ``config_class`` (a :class:`ComponentConfig`, with a
``version``), and each plugin that takes options registers a :class:`PluginOptions` dataclass.
Options from Python (``scheme_options={...}``, ``plugin_options={"gptq": {...}}``) or the CLI
(``--scheme-opt KEY=VALUE``, ``--gptq-opt KEY=VALUE``) are validated against it: an unknown key
is an error that lists the valid keys, a value that does not parse names the expected type.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from .errors import UsageError

__all__ = [
    "ComponentConfig",
    "PluginOptions",
    "closest",
    "config_to_dict",
    "did_you_mean",
    "parse_options",
    "plugin_mark",
    "split_key_values",
]


@dataclass(frozen=True)
class ComponentConfig:
    """Base of every component's options dataclass. ``version`` is the schema version."""

    version: int = 1


@dataclass(frozen=True)
class PluginOptions(ComponentConfig):
    """Base of a plugin's options dataclass (registered with ``monoquant_register_options``).

    A plugin that takes options is enabled for a run when its name is a key of
    ``plugin_options`` (CLI: ``--NAME``, or any ``--NAME-opt KEY=VALUE``);
    ``{"enable": False}`` (``--NAME-opt enable=false``) turns it off again. Plugins read their
    options with ``run.options("NAME")``, which is None when the plugin is not enabled.
    """

    enable: bool = True


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """A JSON-friendly dict of a component config (empty for None)."""
    if cfg is None:
        return {}
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)}


def closest(name: Any, choices: Iterable[str]) -> str | None:
    """The one of ``choices`` a misspelt ``name`` most likely meant (``difflib``, ignoring
    case), or None when none is close."""
    folded = {c.lower(): c for c in choices}
    hit = folded.get(str(name).lower())
    if hit is None:
        close = difflib.get_close_matches(str(name).lower(), list(folded), n=1, cutoff=0.6)
        hit = folded[close[0]] if close else None
    return hit if hit != name else None


def did_you_mean(name: Any, choices: Iterable[str]) -> str:
    """``"did you mean 'int8'? "`` (the start of a ``fix``), or ``""`` when nothing in
    ``choices`` is close to ``name``."""
    hit = closest(name, choices)
    return f"did you mean {hit!r}? " if hit is not None else ""


def split_key_values(pairs: tuple[str, ...] | list[str], flag: str) -> dict[str, str]:
    """Parse ``["k=v", ...]`` from the CLI into a dict (error names ``flag`` on bad syntax)."""
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"{flag} {pair!r} is not KEY=VALUE", f"write it as {flag} key=value")
        out[key.strip()] = value.strip()
    return out


def parse_options(cls: type, options: Mapping[str, Any] | None, owner: str) -> Any:
    """Build ``cls`` (a ComponentConfig dataclass) from user options, with clear errors.

    Args:
        cls: the component's ``config_class``.
        options: key -> value; string values are converted by the field's annotation.
        owner: e.g. ``"scheme 'int8'"``, used in messages.
    """
    options = dict(options or {})
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "version" and f.init}
    valid = ", ".join(sorted(fields)) or "(none)"
    values: dict[str, Any] = {}
    for raw_key, raw in options.items():
        key = raw_key.replace("-", "_")
        if key not in fields:
            raise UsageError(
                f"unknown option {raw_key!r} for {owner} (valid keys: {valid})",
                f"{did_you_mean(key, fields)}use one of the valid keys",
            )
        values[key] = _convert(raw, hints[key], f"{owner} option {raw_key!r}")
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:
        raise UsageError(f"invalid options for {owner}: {e}", f"valid keys: {valid}") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def plugin_mark(known: Any, name: str, options: Mapping[str, Any] | None, where: str) -> dict:
    """A ``+PLUGIN`` mark (a rule's, a sensitivity candidate's): ``options`` validated by the
    plugin's registered options class, defaults filled in, without ``enable`` and ``version``:
    what ``entry.options[name]`` holds. ``known``: the registry of plugin options classes
    (``run.registries.options``); ``where`` starts the error of an unknown plugin."""
    if name not in known:
        raise UsageError(
            f"{where}+{name} names no plugin that takes options "
            f"({', '.join(known.names()) or 'none installed'})",
            f"{did_you_mean(name, known.names())}mark a plugin that acts per module, e.g. +outlier",
        )
    parsed = parse_options(known.get(name), options, f"plugin {name!r}")
    return {k: v for k, v in config_to_dict(parsed).items() if k not in ("enable", "version")}


def _convert(raw: Any, hint: Any, what: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        is_none = raw is None or (isinstance(raw, str) and raw.lower() in ("none", "null"))
        if is_none and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _convert(raw, a, what)
            except UsageError as e:
                errors.append(e)
        raise errors[0] if errors else UsageError(f"{what}: cannot parse {raw!r}")
    if origin is Literal:
        for choice in args:
            if raw == choice or (isinstance(raw, str) and str(choice) == raw):
                return choice
        shown = ", ".join(str(a) for a in args)
        raise UsageError(f"{what} is {raw!r}, not one of: {shown}", f"use one of {shown}")
    if hint is bool:
        if isinstance(raw, bool):
            return raw
        if isinstance(raw, str) and raw.lower() in _TRUE | _FALSE:
            return raw.lower() in _TRUE
        raise UsageError(f"{what} is {raw!r}, not a boolean", "use true or false")
    if hint in (int, float):
        if isinstance(raw, bool):
            raise UsageError(f"{what} is {raw!r}, not a number", f"give a {hint.__name__}")
        if isinstance(raw, (int, float)):
            if hint is float or float(raw).is_integer():
                return hint(raw)
            raise UsageError(f"{what} is {raw!r}, not an int", "give a whole number")
        try:
            return hint(raw)
        except (TypeError, ValueError):
            article = "an" if hint is int else "a"
            raise UsageError(
                f"{what} is {raw!r}, not {article} {hint.__name__}", "give a number"
            ) from None
    if hint is str:
        return str(raw)
    return raw
