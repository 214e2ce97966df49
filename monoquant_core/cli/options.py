"""The options ``quantize`` and ``plan`` share, and the plugin options the core generates.

Every plugin that registers an options dataclass (``monoquant_register_options``) gets two
flags, generated here: ``--NAME`` (enable it with its defaults) and ``--NAME-opt KEY=VALUE``
(repeatable; implies ``--NAME``). A plugin may add friendlier spellings of single options with
``monoquant_add_cli_options``; their values go to the option of the same key. Everything ends
up in ``plugin_options`` and is validated against the dataclass by ``Engine.configure``, so an
unknown key is a one-line error listing the valid keys, the same as in Python.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import click

from ..config import Config
from ..engine import Engine
from ..errors import PluginLoadError, UsageError
from ..options import split_key_values
from ..rules import load_rules_file

__all__ = [
    "PluginFlags",
    "PluginOptionGroup",
    "add_plugin_commands",
    "attach_plugin_flags",
    "config_from",
    "model_options",
    "model_source_options",
    "plugin_flags",
    "report_options",
]


def model_source_options(
    model_help: str, weights: bool = True
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--demo``, ``--model`` (and ``--weights``): which float model a command builds."""
    opts = [
        click.option(
            "--demo", is_flag=True, help="Use the bundled demo model (a small seeded transformer)."
        ),
        click.option("--model", "model_spec", metavar="PKG.MODULE:FACTORY", help=model_help),
    ]
    if weights:
        opts.append(
            click.option(
                "--weights",
                type=click.Path(dir_okay=False),
                help="Float weights for --model (.safetensors, or a .pt state_dict).",
            )
        )

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        for opt in reversed(opts):
            f = opt(f)
        return f

    return apply


def report_options(what: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``--json`` (print JSON) and ``--html FILE`` (also write a self-contained page of
    ``what``) for report-printing commands."""

    def apply(f: Callable[..., Any]) -> Callable[..., Any]:
        f = click.option(
            "--html",
            "html_path",
            type=click.Path(dir_okay=False),
            help=f"Also write a self-contained HTML report ({what}).",
        )(f)
        return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(f)

    return apply


def model_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """The model and configuration options of ``quantize`` and ``plan``."""
    opts = [
        click.option("--scheme", default="int8", show_default=True, help="Quantization scheme."),
        click.option("--observer", default=None, help="Observer (default: the scheme's)."),
        click.option("--backend", default=None, help="Force a backend (default: best per layer)."),
        click.option(
            "--only",
            multiple=True,
            metavar="GLOB",
            help="Quantize only modules whose name matches (fnmatch; repeatable).",
        ),
        click.option(
            "--skip",
            multiple=True,
            metavar="GLOB",
            help="Never quantize modules whose name matches (fnmatch; repeatable).",
        ),
        click.option(
            "--rule",
            "rule",
            multiple=True,
            metavar="GLOB=SCHEME[,k=v]",
            help="Per-layer override, first match wins: 'lm_head=int8', "
            "'blocks.0.*=int4-group,group_size=32', 'embed=skip' (repeatable).",
        ),
        click.option(
            "--rules",
            "rules_file",
            type=click.Path(dir_okay=False),
            help="Rules file: a JSON list of rules, or TOML [[rule]] tables.",
        ),
        click.option("--scheme-opt", multiple=True, metavar="KEY=VALUE", help="Scheme option."),
        click.option("--observer-opt", multiple=True, metavar="KEY=VALUE", help="Observer option."),
        click.option(
            "--expect-batch",
            "expect_batch",
            type=click.IntRange(min=1),
            multiple=True,
            metavar="ROWS",
            help="Input rows (batch x tokens) the model will run at; the plan warns about layers "
            "expected slower than float there (repeatable; default: 1 and 128).",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table."),
    ]
    for opt in reversed(opts):
        f = opt(f)
    return model_source_options("Import a callable that returns the nn.Module to quantize.")(f)


class PluginOptionGroup:
    """What ``monoquant_add_cli_options(group)`` receives: ``group.add_option(...)``."""

    def __init__(self, plugin: str, keys: tuple[str, ...] | None = None):
        self.plugin = plugin
        self.keys = keys  # the fields of the plugin's options dataclass (None: no dataclass)
        self.options: list[click.Option] = []

    def add_option(self, *param_decls: str, **attrs: Any) -> None:
        """Add a ``click.Option`` named ``--<plugin>-<key>`` for the option ``<key>``.

        The option's parameter name (click's, or an explicit one among ``param_decls``) must
        be ``<plugin>_<key>`` with ``<key>`` a field of the plugin's options dataclass.
        """
        prefix = f"--{self.plugin}-"
        longs = [d for d in param_decls if d.startswith("--")]
        if not longs or not all(d.startswith(prefix) for d in longs):
            raise PluginLoadError(
                f"plugin {self.plugin!r} adds CLI option {param_decls}, which does not start "
                f"with {prefix!r}",
                f"name plugin options {prefix}<key> (--{self.plugin} itself is generated)",
            )
        opt = click.Option(list(param_decls), **attrs)
        stem = self.plugin.replace("-", "_") + "_"
        key = (opt.name or "")[len(stem) :]
        if not (opt.name or "").startswith(stem) or not key:
            raise PluginLoadError(
                f"plugin {self.plugin!r} adds CLI option {param_decls} with parameter name "
                f"{opt.name!r}, which does not start with {stem!r}",
                f"give it an explicit name such as '{stem}<key>' among the declarations",
            )
        if self.keys is None:
            raise PluginLoadError(
                f"plugin {self.plugin!r} adds CLI option {longs[0]} but registers no options",
                "register an options dataclass with monoquant_register_options",
            )
        if key not in self.keys:
            raise PluginLoadError(
                f"plugin {self.plugin!r} adds CLI option {longs[0]} for key {key!r}, which its "
                f"options do not have (keys: {', '.join(self.keys)})",
                f"name the option {prefix}<key> after one of its options' fields",
            )
        self.options.append(opt)


@dataclass
class PluginFlags:
    """The generated and plugin-added CLI options of one plugin."""

    plugin: str
    options: list[click.Option]
    enable: str  # parameter name of --NAME
    opt: str  # parameter name of --NAME-opt
    aliases: dict[str, str] = field(default_factory=dict)  # parameter name -> option key

    def take(self, kw: dict[str, Any]) -> dict[str, Any] | None:
        """Pop this plugin's values from ``kw``: its ``plugin_options`` entry, or None."""
        enabled = kw.pop(self.enable, False)
        opts: dict[str, Any] = split_key_values(kw.pop(self.opt, ()), f"--{self.plugin}-opt")
        for param, key in self.aliases.items():
            value = kw.pop(param, None)
            if value is None or value is False:
                continue
            if key in opts and str(opts[key]) != str(value):
                raise UsageError(
                    f"--{self.plugin}-opt {key}={opts[key]} and "
                    f"--{param.replace('_', '-')} {value} set the same option",
                    "give the option once",
                )
            opts[key] = value
        return opts if (enabled or opts) else None


def plugin_flags(engine: Engine) -> list[PluginFlags]:
    """Generate ``--NAME`` / ``--NAME-opt`` for every plugin with options, plus the options
    plugins add with ``monoquant_add_cli_options`` (a broken one is reported and left out)."""
    out: dict[str, PluginFlags] = {}
    for reg in engine.registries.options:
        stem = reg.plugin.replace("-", "_")
        doc = (reg.component.__doc__ or "").strip().split("\n\n")[0]
        keys = ", ".join(_keys(reg.component))
        enable, opt = f"plugin__{stem}__enable", f"plugin__{stem}__opt"
        out[reg.plugin] = PluginFlags(
            reg.plugin,
            [
                click.Option(
                    [f"--{reg.plugin}", enable],
                    is_flag=True,
                    help=f"Enable plugin {reg.plugin!r}: {' '.join(doc.split())}",
                ),
                click.Option(
                    [f"--{reg.plugin}-opt", opt],
                    multiple=True,
                    metavar="KEY=VALUE",
                    help=f"Option of plugin {reg.plugin!r} (implies --{reg.plugin}): {keys}.",
                ),
            ],
            enable,
            opt,
        )
    for plugin, group in _added_options(engine):
        flags = out.get(plugin)
        if flags is None:
            continue
        for option in group.options:
            flags.options.append(option)
            flags.aliases[option.name] = option.name[len(plugin.replace("-", "_")) + 1 :]
    return list(out.values())


def _keys(cls: type) -> list[str]:
    return [f.name for f in dataclasses.fields(cls) if f.init and f.name != "version"]


def _call(engine: Engine, impl: Any, hook: str, given: dict[str, Any]) -> bool:
    """Call one plugin's CLI hook with the arguments it declares; a failure is reported like
    a plugin that fails to load (False), never raised (unless strict)."""
    name = impl.plugin_name
    try:
        impl.function(**{k: v for k, v in given.items() if k in impl.argnames})
        return True
    except PluginLoadError as e:
        engine.report_plugin_failure(e)
    except Exception as e:
        engine.report_plugin_failure(
            PluginLoadError(
                f"plugin {name!r} failed in {hook}: {type(e).__name__}: {e}",
                f"disable it with MONOQUANT_DISABLE_PLUGINS={name}",
            )
        )
    return False


def _added_options(engine: Engine) -> list[tuple[str, PluginOptionGroup]]:
    """Call each plugin's ``monoquant_add_cli_options`` with a group bound to it."""
    out = []
    for impl in engine.pm.hook.monoquant_add_cli_options.get_hookimpls():
        name = impl.plugin_name
        cls = engine.registries.options.get(name) if name in engine.registries.options else None
        group = PluginOptionGroup(name, tuple(_keys(cls)) if cls else None)
        if _call(engine, impl, "monoquant_add_cli_options", {"group": group}):
            out.append((name, group))
    return out


def add_plugin_commands(cli: click.Group, engine: Engine) -> None:
    """Call each plugin's ``monoquant_add_cli_commands``: a plugin that fails, or adds a
    command whose name is taken, is reported (a plugin load error) and its commands left out."""
    for impl in engine.pm.hook.monoquant_add_cli_commands.get_hookimpls():
        name = impl.plugin_name
        probe = click.Group()
        given = {"cli": probe, "engine": engine}
        if not _call(engine, impl, "monoquant_add_cli_commands", given):
            continue
        taken = sorted(set(probe.commands) & set(cli.commands))
        if taken:
            engine.report_plugin_failure(
                PluginLoadError(
                    f"plugin {name!r} adds the command(s) {taken}, which already exist",
                    f"rename them, or disable it with MONOQUANT_DISABLE_PLUGINS={name}",
                )
            )
            continue
        for cmd_name, cmd in probe.commands.items():
            cli.add_command(cmd, cmd_name)


def config_from(engine: Engine, flags: list[PluginFlags], kw: dict[str, Any]) -> Config:
    """The run's :class:`Config` from the shared options (popped from ``kw``)."""
    rules: list[Any] = []
    rules_file = kw.pop("rules_file")
    if rules_file:
        rules.extend(load_rules_file(rules_file))
    rules.extend(kw.pop("rule"))
    plugin_options = {}
    for f in flags:
        opts = f.take(kw)
        if opts is not None:
            plugin_options[f.plugin] = opts
    return engine.configure(
        scheme=kw.pop("scheme"),
        observer=kw.pop("observer"),
        backend=kw.pop("backend"),
        only=kw.pop("only"),
        skip=kw.pop("skip"),
        scheme_options=split_key_values(kw.pop("scheme_opt"), "--scheme-opt"),
        observer_options=split_key_values(kw.pop("observer_opt"), "--observer-opt"),
        plugin_options=plugin_options,
        rules=rules,
        stats=kw.pop("stats", "sample"),
        expect_batch=kw.pop("expect_batch") or None,
    )


def attach_plugin_flags(engine: Engine, cmd: click.Command, flags: list[PluginFlags]) -> None:
    """Add each plugin's options to ``cmd``; a plugin whose flag names a built-in option of the
    command is reported (a warning, or an error in strict mode) and left out."""
    taken = {o for p in cmd.params for o in (*p.opts, *getattr(p, "secondary_opts", []))}
    for f in flags:
        clash = sorted({o for opt in f.options for o in opt.opts} & taken)
        if clash:
            engine.report_plugin_failure(
                PluginLoadError(
                    f"plugin {f.plugin!r}: its CLI option {clash[0]} is a built-in option of "
                    f"`monoquant {cmd.name}`",
                    f"rename the plugin, or disable it with MONOQUANT_DISABLE_PLUGINS={f.plugin}",
                )
            )
            continue
        cmd.params.extend(f.options)
        taken.update(o for opt in f.options for o in opt.opts)
