"""Broken third-party plugins, seen from the command line, as docs/plugins/index.md describes.

tests/core/test_loading.py checks the same plugins through the Python API; here the real
console-script path runs (``monoquant_core.cli.main`` in-process) with fake installed
distributions.
"""

from __future__ import annotations

import json
import textwrap

from monoquant_core.registry import ranked_backends
from tests.helpers import cli_one_line_error

pytest_plugins = ["monoquant_core.testing.plugin"]

BROKEN = "raise RuntimeError('boom at import')\n"

CLASH = textwrap.dedent(
    """
    from monoquant_plugins.int8 import Int8Scheme
    from monoquant_core import hookimpl

    @hookimpl
    def monoquant_register_schemes(register):
        register(Int8Scheme())
    """
)

TYPO = textwrap.dedent(
    """
    from monoquant_core import hookimpl

    @hookimpl
    def monoquant_register_schems(register):
        pass
    """
)

EXITS = "import sys\nsys.exit(7)\n"

SLEEPS = "import time\ntime.sleep(0.8)\n"

FLAKY = textwrap.dedent(
    """
    from monoquant_plugins.backends.reference import ReferenceBackend
    from monoquant_core import hookimpl

    class FlakyBackend(ReferenceBackend):
        name = "flaky"
        priority = 100

        def available(self):
            raise OSError("driver exploded")

    @hookimpl
    def monoquant_register_backends(register):
        register(FlakyBackend())
    """
)


def test_plugin_that_raises_on_import(cli_runner, fake_distribution, monkeypatch):
    fake_distribution("monoquant-broken", {"broken": "mq_cli_broken"}, {"mq_cli_broken": BROKEN})
    res = cli_runner.invoke("plugins")
    assert res.exit_code == 0, res.output
    assert res.stderr.count("\n") == 1  # one warning line
    assert "plugin 'broken' from monoquant-broken 0.1.0 failed to load" in res.stderr
    assert "boom at import" in res.stderr and "MONOQUANT_DISABLE_PLUGINS=broken" in res.stderr
    assert "int8" in res.stdout and "failed to load: problem: plugin 'broken'" in res.stdout
    res = cli_runner.invoke("plugins", "--json")
    (failed,) = json.loads(res.stdout)["failed"]
    assert failed.startswith("problem: plugin 'broken' from monoquant-broken 0.1.0 failed to load")
    res = cli_runner.invoke("quantize", "--demo", "-q")
    assert res.exit_code == 0, res.output  # the tool keeps working
    cli_one_line_error(cli_runner.invoke("--strict-plugins", "plugins"), "boom at import")
    monkeypatch.setenv("MONOQUANT_STRICT_PLUGINS", "1")
    cli_one_line_error(cli_runner.invoke("plugins"), "monoquant-broken 0.1.0")
    monkeypatch.setenv("MONOQUANT_DISABLE_PLUGINS", "monoquant-broken")
    res = cli_runner.invoke("plugins")
    assert res.exit_code == 0 and res.stderr == "" and "broken" not in res.stdout


def test_clashing_name_is_a_one_line_warning_naming_both(cli_runner, fake_distribution):
    """docs/plugins/index.md: the later plugin is left out with one warning line; every
    command, `plugins` included, keeps working; --strict-plugins makes it an error."""
    fake_distribution("monoquant-clash", {"clash": "mq_cli_clash"}, {"mq_cli_clash": CLASH})
    needles = (
        "scheme 'int8' is registered twice",
        "(distribution monoquant 0.1.0)",
        "(distribution monoquant-clash 0.1.0)",
        "MONOQUANT_DISABLE_PLUGINS=clash",
    )
    for args in (("quantize", "--demo", "-q"), ("plugins",)):
        res = cli_runner.invoke(*args)
        assert res.exit_code == 0, res.output
        assert res.stderr.startswith("monoquant: problem: ") and res.stderr.count("\n") == 1
        assert all(n in res.stderr for n in needles), res.stderr
        assert "keeps working without plugin 'clash'" in res.stderr
    assert "failed to load: problem: scheme 'int8' is registered twice" in res.stdout
    assert "clash " not in res.stdout.split("failed to load")[0]  # not in the table
    cli_one_line_error(cli_runner.invoke("--strict-plugins", "plugins"), *needles)


def test_misspelt_hook_is_a_one_line_warning_naming_it(cli_runner, fake_distribution):
    fake_distribution("monoquant-typo", {"typo": "mq_cli_typo"}, {"mq_cli_typo": TYPO})
    needle = (
        "plugin 'typo' (distribution monoquant-typo 0.1.0) implements "
        "'monoquant_register_schems', which is not a Mono Quant hook"
    )
    res = cli_runner.invoke("plugins")
    assert res.exit_code == 0, res.output
    assert res.stderr.count("\n") == 1 and needle in res.stderr, res.stderr
    assert "did you mean 'monoquant_register_schemes'?" in res.stderr
    assert f"failed to load: problem: {needle}" in res.stdout
    cli_one_line_error(cli_runner.invoke("--strict-plugins", "plugins"), needle)


def test_plugin_that_exits_on_import(cli_runner, fake_distribution):
    """sys.exit() at import used to end every command silently with its exit code."""
    fake_distribution("monoquant-quit", {"quit": "mq_cli_quit"}, {"mq_cli_quit": EXITS})
    res = cli_runner.invoke("quantize", "--demo", "-q")
    assert res.exit_code == 0, res.output
    assert res.stderr.count("\n") == 1, res.stderr
    assert "plugin 'quit' from monoquant-quit 0.1.0 failed to load" in res.stderr
    assert "it called sys.exit(7) while being imported" in res.stderr
    assert "MONOQUANT_DISABLE_PLUGINS=quit" in res.stderr
    cli_one_line_error(cli_runner.invoke("--strict-plugins", "plugins"), "sys.exit(7)")


def test_plugin_that_hangs_on_import_is_named_on_stderr(cli_runner, fake_distribution, monkeypatch):
    """A hanging import cannot be interrupted from inside: after MONOQUANT_SLOW_IMPORT_S
    seconds one line names it and how to skip it; `plugins` lists slow imports."""
    fake_distribution("monoquant-slow", {"slow": "mq_cli_slow"}, {"mq_cli_slow": SLEEPS})
    monkeypatch.setenv("MONOQUANT_SLOW_IMPORT_S", "0.2")
    res = cli_runner.invoke("plugins")
    assert res.exit_code == 0, res.output
    assert res.stderr == (
        "monoquant: plugin 'slow' (monoquant-slow 0.1.0) has been importing for 0.2 s; "
        "MONOQUANT_DISABLE_PLUGINS=slow skips it\n"
    ), res.stderr
    (line,) = [ln for ln in res.stdout.splitlines() if ln.startswith("slow to import")]
    assert line.startswith("slow to import: plugin 'slow' took ")
    assert line.endswith(" s; MONOQUANT_DISABLE_PLUGINS=slow skips it")
    monkeypatch.setenv("MONOQUANT_DISABLE_PLUGINS", "slow")
    res = cli_runner.invoke("plugins")
    assert res.stderr == "" and "slow to import" not in res.stdout


def test_ctrl_c_on_a_hanging_import_names_the_plugin(cli_runner, fake_distribution):
    fake_distribution(
        "monoquant-hang", {"hang": "mq_cli_hang"}, {"mq_cli_hang": "raise KeyboardInterrupt\n"}
    )
    res = cli_runner.invoke("plugins")
    assert res.exit_code == 130 and res.stdout == "", res.output
    assert res.stderr == (
        "monoquant: interrupted while importing plugin 'hang' (monoquant-hang 0.1.0); "
        "MONOQUANT_DISABLE_PLUGINS=hang skips it\n"
    )


def test_backend_whose_available_raises_is_marked_unavailable(
    cli_runner, fake_distribution, mq_engine
):
    fake_distribution("monoquant-flaky", {"flaky": "mq_cli_flaky"}, {"mq_cli_flaky": FLAKY})
    res = cli_runner.invoke("env", "--json")
    assert res.exit_code == 0, res.output
    backends = {b["name"]: b for b in json.loads(res.stdout)["backends"]}
    assert backends["flaky"]["available"] == "no: available() raised OSError: driver exploded"
    res = cli_runner.invoke("plan", "--demo", "--json")
    assert res.exit_code == 0, res.output
    entries = [e for e in json.loads(res.stdout)["entries"] if e["action"] == "quantize"]
    assert entries and all(e["backend"] != "flaky" for e in entries)
    cli_one_line_error(
        cli_runner.invoke("quantize", "--demo", "--backend", "flaky"),
        "backend 'flaky' is not available here: available() raised OSError: driver exploded",
    )
    engine = type(mq_engine)()
    assert "flaky" in engine.backends
    assert all(b.name != "flaky" for b in ranked_backends(engine.backends))
