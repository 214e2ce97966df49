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


def test_clashing_name_is_a_one_line_error_naming_both(cli_runner, fake_distribution):
    fake_distribution("monoquant-clash", {"clash": "mq_cli_clash"}, {"mq_cli_clash": CLASH})
    cli_one_line_error(
        cli_runner.invoke("quantize", "--demo"),
        "scheme 'int8' is registered twice",
        "(distribution monoquant 0.1.0)",
        "(distribution monoquant-clash 0.1.0)",
        "MONOQUANT_DISABLE_PLUGINS=clash",
    )


def test_misspelt_hook_is_a_one_line_error_naming_it(cli_runner, fake_distribution):
    fake_distribution("monoquant-typo", {"typo": "mq_cli_typo"}, {"mq_cli_typo": TYPO})
    cli_one_line_error(
        cli_runner.invoke("plugins"),
        "plugin 'typo' (distribution monoquant-typo 0.1.0) implements "
        "'monoquant_register_schems', which is not a Mono Quant hook",
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
