"""The import layering of ``monoquant_core``, read from the source (ast) and checked against the
layer table of docs/architecture.md: no upward import, no circle, hookspecs/markers import
nothing from the project, no unexplained function-level import, no ``noqa: E402``.

The checker is tested on small fake packages too, so it is known to fail when it should.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CORE = ROOT / "monoquant_core"
ARCHITECTURE = ROOT / "docs" / "architecture.md"
LEAVES = ("hookspecs", "markers")  # import nothing from the project at run time


def module_names(package: Path) -> dict[str, Path]:
    """``dotted name relative to the package -> file`` (``__init__`` for the package itself)."""
    out = {}
    for p in sorted(package.rglob("*.py")):
        parts = list(p.relative_to(package).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def _package_of(name: str, path: Path) -> list[str]:
    if name == "__init__":
        return []
    parts = name.split(".")
    return parts if path.name == "__init__.py" else parts[:-1]


def _targets(node: ast.ImportFrom | ast.Import, name: str, path: Path, mods, top: str) -> set[str]:
    """The project modules an import statement loads (``from . import x`` -> ``x`` when ``x``
    is a module, else the package)."""
    out: set[str] = set()
    if isinstance(node, ast.Import):
        for a in node.names:
            if a.name == top or a.name.startswith(top + "."):
                rel = a.name[len(top) :].lstrip(".")
                out.add(rel or "__init__")
        return out
    if node.level:
        pkg = _package_of(name, path)
        base = pkg[: len(pkg) - (node.level - 1)] if node.level > 1 else pkg
        stem = ".".join(base + ([node.module] if node.module else []))
    elif node.module and (node.module == top or node.module.startswith(top + ".")):
        stem = node.module[len(top) :].lstrip(".")
    else:
        return out
    for a in node.names:
        sub = f"{stem}.{a.name}".lstrip(".")
        out.add(sub if sub in mods else (stem or "__init__"))
    return out


def _is_type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def import_graph(package: Path) -> tuple[dict[str, set[str]], list[str]]:
    """Run-time module-level imports between the package's modules, and the function-level
    project imports that lack a ``# deferred:`` comment (as ``file:line`` problems)."""
    mods = module_names(package)
    top = package.name
    graph: dict[str, set[str]] = {}
    problems: list[str] = []
    for name, path in mods.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()
        tree = ast.parse(text)
        deps: set[str] = set()
        stack: list[tuple[ast.AST, bool]] = [(n, False) for n in tree.body]
        while stack:
            node, in_function = stack.pop()
            if _is_type_checking(node):
                continue
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found = _targets(node, name, path, mods, top) - {name}
                if in_function and found:
                    here = lines[node.lineno - 1] + (
                        lines[node.lineno - 2] if node.lineno > 1 else ""
                    )
                    if "# deferred:" not in here:
                        problems.append(
                            f"{path.name}:{node.lineno} imports {sorted(found)} inside a function "
                            "without a '# deferred: <reason>' comment"
                        )
                else:
                    deps |= found
                continue
            inner = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            stack.extend((child, inner) for child in ast.iter_child_nodes(node))
        graph[name] = deps
    return graph, problems


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every circle found by a depth-first search (each as a closed path)."""
    found: list[list[str]] = []
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(n: str) -> None:
        state[n] = 1
        path.append(n)
        for d in sorted(graph.get(n, ())):
            if state.get(d) == 1:
                found.append([*path[path.index(d) :], d])
            elif d not in state:
                visit(d)
        path.pop()
        state[n] = 2

    for n in sorted(graph):
        if n not in state:
            visit(n)
    return found


def read_layers(markdown: str) -> dict[str, int]:
    """``module pattern -> layer number`` from the layer table (rows ``| N name | `a`, ... |``)."""
    out: dict[str, int] = {}
    for line in markdown.splitlines():
        m = re.match(r"^\|\s*(\d+)\s+[^|]*\|([^|]*)\|", line)
        if not m:
            continue
        for pattern in re.findall(r"`([^`]+)`", m.group(2)):
            out[pattern] = int(m.group(1))
    return out


def layer_of(module: str, layers: dict[str, int]) -> int | None:
    if module in layers:
        return layers[module]
    for pattern, n in layers.items():
        if pattern.endswith(".*") and module.startswith(pattern[:-1]):
            return n
        if pattern.endswith(".*") and module == pattern[:-2]:
            return n
    return None


def violations(package: Path, layers: dict[str, int], leaves=LEAVES) -> list[str]:
    """Every breach of the layering rules (empty when the package is clean)."""
    graph, problems = import_graph(package)
    out = list(problems)
    for mod in sorted(graph):
        if layer_of(mod, layers) is None:
            out.append(f"{mod} is in no layer of the table")
    for mod, deps in sorted(graph.items()):
        here = layer_of(mod, layers)
        for d in sorted(deps):
            there = layer_of(d, layers)
            if here is not None and there is not None and there > here:
                out.append(f"{mod} (layer {here}) imports {d} (layer {there}): an upward import")
        if mod in leaves and deps:
            out.append(f"{mod} imports {sorted(deps)} from the project (it must import nothing)")
    out += ["circle: " + " -> ".join(c) for c in cycles(graph)]
    for p in package.rglob("*.py"):
        if "noqa: E402" in p.read_text(encoding="utf-8"):
            out.append(f"{p.name} carries '# noqa: E402'")
    return out


# --------------------------------------------------------------------------- the real package


def test_monoquant_core_follows_the_layer_table():
    layers = read_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    assert layers, "docs/architecture.md has no layer table"
    assert violations(CORE, layers) == []


def test_every_layer_table_entry_is_a_module():
    layers = read_layers(ARCHITECTURE.read_text(encoding="utf-8"))
    mods = module_names(CORE)
    missing = [p for p in layers if p.removesuffix(".*") not in mods]
    assert missing == []


def test_plugins_import_only_the_public_core_or_its_leaf_modules():
    """Plugins use ``monoquant_core`` (the public API) and a few stable helper modules."""
    # atomic: a serializer's temporary files carry the core's owner tag (temp_tag)
    allowed = {"", "metrics", "options", "layout", "affine", "activations", "qtensor"}
    allowed |= {"hardware", "atomic"}
    # plugin commands (monoquant_add_cli_commands) reuse the CLI's model/data loaders and flags,
    # the calibration batch normaliser and the table printer, so `monoquant sensitivity` takes
    # the same --demo/--model/--weights/--calibration as `quantize`
    allowed |= {"batches", "tables", "cli.inputs", "cli.options"}
    # the transformers plugin attaches the Hugging Face integration's quantizer to a model
    allowed |= {"hf"}
    for p in (ROOT / "plugins").rglob("*.py"):
        for node in ast.walk(ast.parse(p.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "monoquant_core"
            ):
                sub = node.module[len("monoquant_core") :].lstrip(".")
                assert sub in allowed, f"{p.name} imports monoquant_core.{sub}"
    assert "noqa: E402" not in "".join(
        p.read_text(encoding="utf-8") for p in (ROOT / "plugins").rglob("*.py")
    )


# --------------------------------------------------------------------------- the checker itself


def _fake(tmp_path: Path, files: dict[str, str]) -> Path:
    pkg = tmp_path / "fakepkg"
    for rel, text in files.items():
        f = pkg / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text, encoding="utf-8")
    return pkg


CLEAN = {
    "__init__.py": "from .top import f\n",
    "base.py": "X = 1\n",
    "mid.py": "from .base import X\n",
    "top.py": "from . import mid\nfrom .base import X\n\ndef f():\n    return mid\n",
    "hookspecs.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .top import f\n",
}
TABLE = """
| layer | modules | job |
|---|---|---|
| 1 base | `base`, `hookspecs` | x |
| 2 mid | `mid` | x |
| 3 top | `top`, `__init__` | x |
"""


def test_the_checker_passes_a_clean_package(tmp_path):
    assert violations(_fake(tmp_path, CLEAN), read_layers(TABLE)) == []


def test_the_checker_fails_on_a_reintroduced_circle(tmp_path):
    files = dict(
        CLEAN,
        **{"base.py": "from .mid import Y\nX = 1\n", "mid.py": "from .base import X\nY = 2\n"},
    )
    found = violations(_fake(tmp_path, files), read_layers(TABLE))
    assert "circle: base -> mid -> base" in found
    assert "base (layer 1) imports mid (layer 2): an upward import" in found


def test_the_checker_fails_on_an_upward_import_a_leaf_import_and_hidden_imports(tmp_path):
    files = dict(
        CLEAN,
        **{
            "mid.py": "from .top import f\n",
            "hookspecs.py": "from .base import X\n",
            "base.py": "def g():\n    from .mid import f\n    return f\n",
            "extra.py": "import os  # noqa: E402\n",
        },
    )
    found = violations(_fake(tmp_path, files), read_layers(TABLE))
    assert "mid (layer 2) imports top (layer 3): an upward import" in found
    assert "hookspecs imports ['base'] from the project (it must import nothing)" in found
    assert any("base.py:2 imports ['mid'] inside a function" in v for v in found)
    assert "extra is in no layer of the table" in found
    assert "extra.py carries '# noqa: E402'" in found


def test_a_deferred_import_with_its_reason_is_allowed(tmp_path):
    files = dict(
        CLEAN,
        **{"base.py": "def g():\n    from .mid import f  # deferred: optional\n    return f\n"},
    )
    found = violations(_fake(tmp_path, files), read_layers(TABLE))
    assert not any("inside a function" in v for v in found)


@pytest.mark.parametrize("leaf", LEAVES)
def test_the_leaves_import_nothing_from_the_project(leaf):
    graph, _ = import_graph(CORE)
    assert graph[leaf] == set()
