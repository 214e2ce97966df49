"""docs/plugins/tutorial.md shows every file of examples/monoquant-example, byte for byte.

A file is shown as a line ``**`monoquant-example/<path>`**`` followed by a fenced block (any
fence of three or more backticks) whose content is the file.
"""

from __future__ import annotations

import difflib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TUTORIAL = ROOT / "docs" / "plugins" / "tutorial.md"
EXAMPLE = ROOT / "examples" / "monoquant-example"
LABEL = re.compile(r"^\*\*`monoquant-example/(?P<path>[^`]+)`\*\*$")
FENCE = re.compile(r"^(?P<fence>`{3,})[\w-]*$")
IGNORED = {"__pycache__", ".pytest_cache", "build", "dist"}


def file_blocks(text: str) -> dict[str, str]:
    """``path -> content`` of every labelled fenced block of ``text``."""
    lines = text.splitlines(keepends=True)
    blocks: dict[str, str] = {}
    for i, line in enumerate(lines):
        label = LABEL.match(line.rstrip("\n"))
        if not label:
            continue
        j = i + 1
        while j < len(lines) and not lines[j].strip():
            j += 1
        opening = FENCE.match(lines[j].rstrip("\n")) if j < len(lines) else None
        assert opening, f"tutorial line {i + 1}: {line.strip()} is not followed by a code block"
        fence = opening.group("fence")
        end = next(k for k in range(j + 1, len(lines)) if lines[k].rstrip("\n") == fence)
        path = label.group("path")
        assert path not in blocks, f"{path} is shown twice"
        blocks[path] = "".join(lines[j + 1 : end])
    return blocks


def example_files() -> list[str]:
    out = []
    for p in EXAMPLE.rglob("*"):
        rel = p.relative_to(EXAMPLE)
        if p.is_file() and not any(
            part in IGNORED or part.endswith(".egg-info") for part in rel.parts
        ):
            out.append(rel.as_posix())
    return sorted(out)


BLOCKS = file_blocks(TUTORIAL.read_text(encoding="utf-8"))


def test_the_tutorial_shows_every_file_of_the_example():
    assert sorted(BLOCKS) == example_files()


@pytest.mark.parametrize("path", example_files())
def test_block_equals_the_file(path):
    want = (EXAMPLE / path).read_text(encoding="utf-8")
    got = BLOCKS.get(path)
    assert got is not None, f"docs/plugins/tutorial.md does not show {path}"
    diff = "".join(
        difflib.unified_diff(
            want.splitlines(keepends=True), got.splitlines(keepends=True), path, "tutorial"
        )
    )
    assert got == want, f"the tutorial's {path} differs from the example:\n{diff}"


def test_parser_finds_nested_fences():
    text = "**`monoquant-example/R.md`**\n\n````markdown\n```console\n$ x\n```\n````\n"
    assert file_blocks(text) == {"R.md": "```console\n$ x\n```\n"}
