"""Docs truth: the shell blocks of README.md and docs/**/*.md run, and say what really happens.

Every fenced block whose language is ``bash``, ``sh``, ``shell`` or ``console`` is executed,
in order, in one scratch folder per Markdown file (so a later block can use what an earlier one
wrote). An HTML comment on the line(s) just above a block's opening fence changes that:

* ``<!-- docs-test: skip REASON -->``: not run; the reason is required (external data, a GPU,
  a command that is this test suite itself, ...).
* ``<!-- docs-test: needs DISTRIBUTION -->``: run only where that distribution is installed
  (``.ci/run`` runs this module again after installing ``examples/monoquant-example``).
* ``<!-- docs-test: file PATH -->``: the block is written to ``PATH`` in the scratch folder
  (any language) before any block of that file runs, e.g. the ``mymodels.py`` a command
  imports or the ``rules.json`` a command reads.
* ``<!-- docs-test: python -->``: the block (a ``python`` one) is run as a script.

How a block runs:

* ``console`` blocks: each ``$ `` line (with its ``\\``-continued lines) is a command; the lines
  after it, up to the next ``$ ``, are its output as the docs show it. A command whose shown
  output has a ``monoquant: problem: ...`` line must exit 1 and print that line (quoted paths
  compared by their last component); ``echo $?`` must print what the docs show; every other
  command must exit 0.
* ``bash`` / ``sh`` / ``shell`` blocks: every command (comment lines skipped, ``\\``-continued
  lines joined) must exit 0.
* ``pip install ...`` is not run (the test runs in the environment CI just installed); a
  ``pip install ... && rest`` runs ``rest``.

The scratch folder starts with the stand-ins the docs use for "your model": ``mypkg/models.py``
(``build()`` is the bundled demo transformer), its float weights as ``model.safetensors``,
``weights.safetensors`` and ``w.safetensors``, and ``calib.pt`` (calibration batches for it).
Everything else a block uses must come from the docs themselves.

Slow (about a minute or two: every command starts a Python): run by ``.ci/run``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
SHELL = {"bash", "sh", "shell", "console"}
FENCE = re.compile(r"^(?P<fence>`{3,})(?P<lang>[\w-]*)(?P<rest>.*)$")
MARKER = re.compile(r"^<!--\s*docs-test:\s*(?P<kind>[\w-]+)\s*(?P<arg>.*?)\s*-->$")
PROBLEM = re.compile(r"^monoquant: problem: .*$")
QUOTED_PATH = re.compile(r"'(?:[^'\s]*/)?([^'/\s]+)/?'")
TIMEOUT_S = 300


@dataclass
class Block:
    doc: Path
    line: int  # 1-based line of the opening fence
    lang: str
    text: str
    markers: dict[str, str] = field(default_factory=dict)

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def parse_blocks(doc: Path, text: str | None = None) -> list[Block]:
    """Every top-level fenced block of ``doc`` with the docs-test markers just above it."""
    lines = (doc.read_text(encoding="utf-8") if text is None else text).splitlines()
    blocks: list[Block] = []
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m.group("fence")
        end = i + 1
        while end < len(lines) and lines[end].rstrip() != fence:
            end += 1
        if end == len(lines):
            raise AssertionError(f"{doc}:{i + 1}: fenced block is never closed")
        markers: dict[str, str] = {}
        j = i - 1
        while j >= 0 and (not lines[j].strip() or MARKER.match(lines[j].strip())):
            mk = MARKER.match(lines[j].strip())
            if mk:
                markers[mk.group("kind")] = mk.group("arg")
            j -= 1
        blocks.append(Block(doc, i + 1, m.group("lang"), "\n".join(lines[i + 1 : end]), markers))
        i = end + 1
    return blocks


@dataclass
class Command:
    text: str
    shown: list[str]  # output lines the docs show (console blocks only)


def console_commands(text: str) -> list[Command]:
    cmds: list[Command] = []
    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if not line.startswith("$ "):
            if cmds:
                cmds[-1].shown.append(line)
            i += 1
            continue
        parts = [line[2:]]
        while parts[-1].endswith("\\") and i + 1 < len(lines):
            i += 1
            parts.append(lines[i])
        cmds.append(Command("\n".join(parts), []))
        i += 1
    return cmds


def script_commands(text: str) -> list[Command]:
    cmds: list[Command] = []
    parts: list[str] = []
    for line in text.splitlines():
        if not parts and (not line.strip() or line.lstrip().startswith("#")):
            continue
        parts.append(line)
        if not line.rstrip().endswith("\\"):
            cmds.append(Command("\n".join(parts), []))
            parts = []
    if parts:
        cmds.append(Command("\n".join(parts), []))
    return cmds


def without_pip(cmd: str) -> str:
    """``pip install X && rest`` -> ``rest``; a lone ``pip install X  # note`` -> ``''``."""
    if not re.match(r"\s*pip install\b", cmd):
        return cmd.strip()
    return cmd.split("&&", 1)[1].strip() if "&&" in cmd else ""


def normalise_problem(line: str) -> str:
    return QUOTED_PATH.sub(lambda m: repr(m.group(1)), line.strip())


def _prepare(folder: Path) -> None:
    from monoquant_core.demo import demo_inputs, demo_model
    from plugins.safetensors_format import write_safetensors

    pkg = folder / "mypkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "models.py").write_text(
        '"""Stand-in for "your model" in the docs: the bundled demo transformer."""\n\n'
        "from monoquant_core.demo import demo_model\n\n\n"
        "def build():\n    return demo_model()\n"
    )
    state = {k: v.contiguous() for k, v in demo_model().state_dict().items()}
    for name in ("model.safetensors", "weights.safetensors", "w.safetensors"):
        write_safetensors(str(folder / name), state, {})
    torch.save([demo_inputs(seed=s) for s in range(4)], folder / "calib.pt")


def _env(folder: Path) -> dict[str, str]:
    env = dict(os.environ)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = os.pathsep.join([str(folder), str(ROOT)])
    env["COLUMNS"] = "200"
    env.pop("MONOQUANT_DISABLE_PLUGINS", None)
    return env


def _run(cmd: str, folder: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "-o", "pipefail", "-c", cmd],
        cwd=folder,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )


def _installed(dist: str) -> bool:
    try:
        metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        return False
    return True


def run_block(block: Block, folder: Path, env: dict[str, str]) -> list[str]:
    """Run one block; the failures, each naming the command."""
    if "file" in block.markers:
        target = folder / block.markers["file"]
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text + "\n")
        return []
    if "python" in block.markers:
        res = subprocess.run(
            [sys.executable, "-c", block.text],
            cwd=folder,
            env=env,
            capture_output=True,
            text=True,
            timeout=TIMEOUT_S,
        )
        if res.returncode != 0:
            return [f"{block.where}: python block exited {res.returncode}:\n{res.stderr[-2000:]}"]
        return []
    console = block.lang == "console"
    failures: list[str] = []
    last_rc = 0
    for cmd in console_commands(block.text) if console else script_commands(block.text):
        text = without_pip(cmd.text)
        if not text:
            continue
        shown = [s for s in cmd.shown if s.strip() and s.strip() != "..."]
        if text.strip() == "echo $?":
            if shown and shown[0].strip() != str(last_rc):
                failures.append(f"{block.where}: `echo $?` shows {shown[0]!r}, real {last_rc}")
            continue
        res = _run(text, folder, env)
        last_rc = res.returncode
        problems = [normalise_problem(s) for s in shown if PROBLEM.match(s.strip())]
        head = f"{block.where}: `{text}`"
        if problems:
            got = [normalise_problem(s) for s in res.stderr.splitlines() if PROBLEM.match(s)]
            if res.returncode != 1:
                failures.append(f"{head} should fail with exit 1, got {res.returncode}")
            for p in problems:
                if p not in got:
                    failures.append(
                        f"{head} shows\n  {p}\nbut prints\n  {got or res.stderr[-800:]}"
                    )
        elif res.returncode != 0:
            failures.append(
                f"{head} exited {res.returncode}:\n{(res.stderr or res.stdout)[-1500:]}"
            )
    return failures


def _doc_id(doc: Path) -> str:
    return doc.relative_to(ROOT).as_posix()


def runnable_blocks(doc: Path) -> list[Block]:
    """The blocks of ``doc`` this test runs here (skip-marked ones left out, after checking
    that each gives its reason; ``needs``-marked ones only where the distribution is)."""
    out = []
    for b in parse_blocks(doc):
        if not (b.lang in SHELL or "file" in b.markers or "python" in b.markers):
            continue
        if "skip" in b.markers:
            assert b.markers["skip"], f"{b.where}: docs-test skip needs a reason"
            continue
        if "needs" in b.markers and not _installed(b.markers["needs"]):
            continue
        out.append(b)
    return out


#: pages with something to run here (the others hold only prose, tables and code fragments)
RUNNABLE = [doc for doc in DOCS if runnable_blocks(doc)]


@pytest.mark.slow
@pytest.mark.parametrize("doc", RUNNABLE, ids=_doc_id)
def test_doc_shell_blocks_run(doc, tmp_path):
    _prepare(tmp_path)
    env = _env(tmp_path)
    failures: list[str] = []
    for b in sorted(runnable_blocks(doc), key=lambda b: "file" not in b.markers):  # files first
        failures += run_block(b, tmp_path, env)
    assert not failures, "\n\n".join(failures)


def test_the_readme_and_the_quickstart_have_runnable_blocks():
    assert {_doc_id(d) for d in RUNNABLE} >= {"README.md", "docs/quickstart.md"}


# -- the harness itself (fast) -------------------------------------------------------------


def test_parser_reads_markers_and_nested_fences():
    text = (
        "<!-- docs-test: skip needs a GPU -->\n\n```bash\nmonoquant env\n```\n"
        "````markdown\n```console\n$ inner\n```\n````\n"
        "<!-- docs-test: file a/b.py -->\n```python\nx = 1\n```\n"
    )
    blocks = parse_blocks(ROOT / "README.md", text)
    assert [(b.lang, b.markers) for b in blocks] == [
        ("bash", {"skip": "needs a GPU"}),
        ("markdown", {}),
        ("python", {"file": "a/b.py"}),
    ]
    assert blocks[1].text == "```console\n$ inner\n```"


def test_console_and_script_commands():
    cmds = console_commands("$ a \\\n    --b\nout 1\n...\n$ echo $?\n1\n")
    assert [(c.text, c.shown) for c in cmds] == [
        ("a \\\n    --b", ["out 1", "..."]),
        ("echo $?", ["1"]),
    ]
    cmds = script_commands("# comment\nx --y   # trailing\n\nz \\\n  --w\n")
    assert [c.text for c in cmds] == ["x --y   # trailing", "z \\\n  --w"]


def test_pip_install_is_dropped():
    assert without_pip("pip install torch==2.13.0 -e . && monoquant quantize --demo") == (
        "monoquant quantize --demo"
    )
    assert without_pip("pip install -e examples/monoquant-example") == ""
    assert without_pip("pip install -e x   # from a checkout; `pip install x` later") == ""
    assert without_pip("python -m pip list") == "python -m pip list"


def test_problem_lines_compare_by_file_name():
    a = "monoquant: problem: output '/tmp/x/demo.safetensors' already exists fix: pass --overwrite"
    b = "monoquant: problem: output '/home/u/demo.safetensors' already exists fix: pass --overwrite"
    assert normalise_problem(a) == normalise_problem(b)
    assert normalise_problem(a) != normalise_problem(a.replace("demo.", "other."))


def test_failing_command_is_reported(tmp_path):
    block = Block(ROOT / "README.md", 1, "console", "$ false\n$ echo $?\n0\n")
    failures = run_block(block, tmp_path, _env(tmp_path))
    assert len(failures) == 2, failures
    assert "`false` exited 1" in failures[0] and "`echo $?` shows '0', real 1" in failures[1]


def test_every_docs_test_marker_is_known():
    known = {"skip", "needs", "file", "python"}
    for doc in DOCS:
        for n, line in enumerate(doc.read_text(encoding="utf-8").splitlines(), 1):
            if "docs-test" in line and line.strip().startswith("<!--"):
                m = MARKER.match(line.strip())
                assert m and m.group("kind") in known, f"{doc}:{n}: unknown marker {line!r}"
