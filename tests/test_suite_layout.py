"""The suite's own layout: test modules share helpers through tests/helpers.py and
tests/records_data.py (and fixtures through conftest.py), never by importing one another, and
the helpers that wait for an event are defined once, in tests/helpers.py."""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

TESTS = Path(__file__).resolve().parent
WAITING = {"eventually", "wait_for", "poll"}  # tests/helpers.py's, not to be written again


def _trees() -> Iterator[tuple[str, ast.Module]]:
    for path in sorted(TESTS.glob("*.py")):
        yield path.name, ast.parse(path.read_text(), str(path))


def _imported(tree: ast.Module) -> Iterator[str]:
    """Every module a file imports, by absolute dotted name."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            if node.level:  # relative: within the tests package
                module = ".".join(part for part in ("tests", module) if part)
            yield module
            if module == "tests":  # from tests import test_x
                yield from (f"{module}.{alias.name}" for alias in node.names)


def test_no_test_module_imports_another() -> None:
    found = {
        f"{name} imports {module}"
        for name, tree in _trees()
        for module in _imported(tree)
        if module.startswith("tests.test_")
    }
    assert not found, "move what is shared to tests/helpers.py: " + "; ".join(sorted(found))


def test_waiting_helpers_are_defined_once() -> None:
    found = {
        f"{name} defines {node.name}"
        for name, tree in _trees()
        if name != "helpers.py"
        for node in ast.walk(tree)
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name in WAITING
    }
    assert not found, "use tests/helpers.py's: " + "; ".join(sorted(found))
