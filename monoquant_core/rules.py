"""Per-layer override rules (mixed precision by rule).

A rule matches module names with an fnmatch pattern and says how those modules are quantized,
or that they are skipped. Rules are checked in order and the **first** match applies. Explicit
``skip`` patterns beat rules, and with ``only`` patterns a module must also match one of them.
A rule that names a scheme also selects opt-in layer types (e.g. embeddings).

Forms accepted everywhere (Python ``rules=[...]``, CLI ``--rule``, ``--rules FILE``):

* ``"lm_head=int8"`` / ``"blocks.0.*=int4-group,group_size=32,observer=histogram"`` /
  ``"embed=skip"``: ``PATTERN=SCHEME`` or ``PATTERN=skip``, then comma-separated ``key=value``;
  the keys ``observer`` and ``backend`` pick components, ``observer.KEY=VALUE`` sets an observer
  option, ``+PLUGIN`` marks the modules for a plugin that acts per module (its options'
  defaults; ``+PLUGIN.KEY=VALUE`` sets one), any other key is a scheme option:
  ``"blocks.*.fc1=int4-group,+outlier.max_fraction=0.02"``.
* ``("lm_head", "int8")`` or ``("blocks.0.*", {"scheme": "int4-group",
  "scheme_options": {"group_size": 32}})``.
* a mapping ``{"pattern": ..., "scheme": ..., "scheme_options": {...}, "observer": ...,
  "observer_options": {...}, "backend": ..., "plugins": {"outlier": {...}}, "skip": true}``
  (also the JSON / TOML file form).

A plugin mark sets ``entry.options[PLUGIN]`` to the plugin's validated options (its registered
options class, defaults filled in), which a plugin acting per module reads (``outlier`` does;
a plugin without per-module behaviour ignores it). The plugin need not be enabled for the run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .errors import UsageError
from .options import did_you_mean

__all__ = ["Rule", "load_rules_file", "parse_rules"]

_KEYS = {
    "pattern", "scheme", "scheme_options", "observer", "observer_options", "backend", "plugins",
    "skip",
}  # fmt: skip


@dataclass(frozen=True)
class Rule:
    """Modules whose name matches ``pattern`` get these settings (None = the run's default)."""

    pattern: str
    scheme: str | None = None
    scheme_options: Mapping[str, Any] = field(default_factory=dict)
    observer: str | None = None
    observer_options: Mapping[str, Any] = field(default_factory=dict)
    backend: str | None = None
    skip: bool = False
    plugins: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)

    def describe(self) -> str:
        if self.skip:
            return f"{self.pattern}=skip"
        parts = [self.scheme or "(default scheme)"]
        parts += [f"{k}={v}" for k, v in self.scheme_options.items()]
        if self.observer:
            parts.append(f"observer={self.observer}")
        parts += [f"observer.{k}={v}" for k, v in self.observer_options.items()]
        if self.backend:
            parts.append(f"backend={self.backend}")
        for name, opts in self.plugins.items():
            parts += [f"+{name}.{k}={v}" for k, v in opts.items()] or [f"+{name}"]
        return f"{self.pattern}={','.join(parts)}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "pattern": self.pattern,
            "scheme": self.scheme,
            "scheme_options": dict(self.scheme_options),
            "observer": self.observer,
            "observer_options": dict(self.observer_options),
            "backend": self.backend,
            "plugins": {k: dict(v) for k, v in self.plugins.items()},
            "skip": self.skip,
        }

    @classmethod
    def parse(cls, text: str) -> Rule:
        """Parse ``PATTERN=SCHEME[,key=value...]`` or ``PATTERN=skip``."""
        pattern, sep, action = text.partition("=")
        pattern, action = pattern.strip(), action.strip()
        if not sep or not pattern or not action:
            raise UsageError(
                f"rule {text!r} is not PATTERN=SCHEME[,key=value...] or PATTERN=skip",
                "write e.g. --rule 'lm_head=int8' or --rule 'embed=skip'",
            )
        head, *pairs = [p.strip() for p in action.split(",")]
        if head == "skip":
            if pairs:
                raise UsageError(f"rule {text!r}: 'skip' takes no options", "drop the options")
            return cls(pattern=pattern, skip=True)
        scheme_options: dict[str, str] = {}
        observer_options: dict[str, str] = {}
        plugins: dict[str, dict[str, str]] = {}
        picks: dict[str, str] = {}
        for pair in pairs:
            key, eq, value = pair.partition("=")
            key = key.strip()
            if key.startswith("+") and len(key) > 1:  # +PLUGIN or +PLUGIN.KEY=VALUE
                name, dot, opt = key[1:].partition(".")
                marks = plugins.setdefault(name, {})
                if dot and opt and eq:
                    marks[opt] = value.strip()
                elif dot or eq:
                    raise UsageError(
                        f"rule {text!r}: {pair!r} is not +PLUGIN or +PLUGIN.KEY=VALUE",
                        "write e.g. +outlier or +outlier.max_fraction=0.02",
                    )
                continue
            if not eq or not key:
                raise UsageError(
                    f"rule {text!r}: {pair!r} is not key=value",
                    "separate options with commas: SCHEME,key=value,key=value",
                )
            if key in ("observer", "backend"):
                picks[key] = value.strip()
            elif key.startswith("observer."):
                observer_options[key[len("observer.") :]] = value.strip()
            else:
                scheme_options[key] = value.strip()
        return cls(
            pattern=pattern,
            scheme=head,
            scheme_options=scheme_options,
            observer=picks.get("observer"),
            observer_options=observer_options,
            backend=picks.get("backend"),
            plugins=plugins,
        )

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], where: str = "rule") -> Rule:
        unknown = sorted(set(data) - _KEYS, key=str)
        if unknown or "pattern" not in data:
            guess = did_you_mean(unknown[0], _KEYS) if unknown else ""
            raise UsageError(
                f"{where} {dict(data)!r} "
                + (f"has unknown keys {unknown}" if unknown else "has no 'pattern'"),
                f"{guess}use the keys: {', '.join(sorted(_KEYS))}",
            )
        return cls(
            pattern=str(data["pattern"]),
            scheme=data.get("scheme"),
            scheme_options=dict(data.get("scheme_options") or {}),
            observer=data.get("observer"),
            observer_options=dict(data.get("observer_options") or {}),
            backend=data.get("backend"),
            skip=bool(data.get("skip", False)),
            plugins=_plugin_marks(data.get("plugins"), where),
        )


def _plugin_marks(raw: Any, where: str) -> dict[str, dict[str, Any]]:
    if raw is None:
        return {}
    if not isinstance(raw, Mapping) or not all(
        isinstance(v, Mapping) or v is None for v in raw.values()
    ):
        raise UsageError(
            f"{where}: 'plugins' is {raw!r}, not a mapping of plugin name -> options",
            'write e.g. "plugins": {"outlier": {"max_fraction": 0.02}}',
        )
    return {str(k): dict(v or {}) for k, v in raw.items()}


def parse_rules(rules: Iterable[Any] | None) -> tuple[Rule, ...]:
    """Normalise the accepted rule forms (see the module docstring) into ``Rule`` objects."""
    out = []
    for item in rules or ():
        if isinstance(item, Rule):
            out.append(item)
        elif isinstance(item, str):
            out.append(Rule.parse(item))
        elif isinstance(item, Mapping):
            out.append(Rule.from_mapping(item))
        elif isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str):
            pattern, action = item
            if isinstance(action, str):
                out.append(Rule.parse(f"{pattern}={action}"))
            elif isinstance(action, Mapping):
                out.append(Rule.from_mapping({"pattern": pattern, **action}))
            else:
                raise UsageError(
                    f"rule {item!r}: the action must be a string or a mapping",
                    "write (pattern, 'int8') or (pattern, {'scheme': ...})",
                )
        else:
            raise UsageError(
                f"rule {item!r} is not a rule",
                "give 'PATTERN=SCHEME', (pattern, action) or a mapping",
            )
    return tuple(out)


def load_rules_file(path: str) -> tuple[Rule, ...]:
    """Rules from a JSON file (a list of rule mappings) or a TOML file (``[[rule]]`` tables)."""
    if not os.path.isfile(path):
        raise UsageError(f"rules file {path!r} does not exist", "check the path")
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".toml"):
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                raise UsageError(
                    "TOML rules files need Python 3.11+", "write the rules as JSON instead"
                ) from None
            data = tomllib.loads(raw.decode("utf-8")).get("rule", [])
        else:
            data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise UsageError(
            f"rules file {path!r} does not parse: {e}",
            "give a JSON list of rules or TOML [[rule]] tables",
        ) from None
    if isinstance(data, Mapping) and "rules" in data:
        data = data["rules"]
    if not isinstance(data, list):
        raise UsageError(
            f"rules file {path!r} holds no list of rules",
            "write a JSON list, or TOML [[rule]] tables",
        )
    return tuple(
        Rule.from_mapping(d, f"{os.path.basename(path)} rule")
        if isinstance(d, Mapping)
        else parse_rules([d])[0]
        for d in data
    )
