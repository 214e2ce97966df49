"""docs/cli.md is generated from the click command tree and must be up to date."""

from __future__ import annotations

from pathlib import Path

from monoquant_core.testing.clidoc import render_cli_doc

pytest_plugins = ["monoquant_core.testing.plugin"]

CLI_MD = Path(__file__).resolve().parents[2] / "docs" / "cli.md"


def test_cli_md_is_up_to_date():
    assert CLI_MD.read_text(encoding="utf-8") == render_cli_doc(), (
        "docs/cli.md is out of date: run `python -m monoquant_core.testing.clidoc > docs/cli.md`"
    )


def test_cli_md_documents_every_command_and_option():
    text = render_cli_doc()
    for command in ("quantize", "plan", "inspect", "verify", "dequantize", "env", "plugins"):
        assert f"## `monoquant {command}`" in text
    assert "| `--scheme-opt KEY=VALUE` |" in text and "| `--strict-plugins` |" in text


def test_installed_plugins_do_not_leak_into_the_page(fake_distribution):
    fake_distribution(
        "monoquant-optioned",
        {"optioned": "mq_doc_optioned"},
        {
            "mq_doc_optioned": (
                "from monoquant_core import hookimpl\n\n"
                "@hookimpl\n"
                "def monoquant_add_cli_options(group):\n"
                "    group.add_option('--optioned-flag', is_flag=True, help='x')\n"
            )
        },
    )
    assert "--optioned-flag" not in render_cli_doc()
