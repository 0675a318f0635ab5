"""The serving package stands apart: nothing in moeserve/ or kernels/ imports the demo, the tiny checkpoints or
training, save the command line, which gathers their commands."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NOT_SERVING = ("moeserve.demo", "moeserve.tiny", "moeserve.training")


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
    return names


def test_serving_code_imports_no_other_part():
    found = {}
    for path in sorted([*(ROOT / "moeserve").rglob("*.py"), *(ROOT / "kernels").rglob("*.py")]):
        if path.relative_to(ROOT) == Path("moeserve/cli.py"):
            continue
        bad = sorted(n for n in _imports(path) if n.startswith(NOT_SERVING))
        if bad:
            found[str(path.relative_to(ROOT))] = bad
    assert found == {}


def test_the_check_sees_imports():
    assert {"moeserve.demo.cli", "moeserve.tiny.cli"} <= _imports(ROOT / "moeserve" / "cli.py")
