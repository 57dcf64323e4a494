"""The README is a map: every `file:function` it names must exist in the code, and it
stays short (the benchmark journal lives in docs/benchmarks/)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"


def _defined(path: Path, dotted: str) -> bool:
    scope = ast.parse(path.read_text()).body
    for name in dotted.split("."):
        node = next((n for n in scope if isinstance(n, (ast.ClassDef, ast.FunctionDef)) and n.name == name), None)
        if node is None:
            return False
        scope = node.body
    return True


def _source(ref: str) -> Path:
    """README paths are from the repository root, or (one level down) relative to
    control/ or workers/."""
    for base in (REPO, REPO / "control", REPO / "workers"):
        if (base / ref).is_file():
            return base / ref
    raise AssertionError(f"README names {ref}, which is not a file of the repository")


def test_readme_map_names_functions_that_exist() -> None:
    refs = re.findall(r"`([\w/.]+\.py):([\w.]+)`", README.read_text())
    assert len(refs) >= 10
    missing = [f"{f}:{name}" for f, name in refs if not _defined(_source(f), name)]
    assert not missing, f"README points at functions that do not exist: {missing}"


def test_readme_follows_one_request_through_at_most_eight_modules() -> None:
    text = README.read_text()
    table = text[text.index("## Follow one request"):text.index("One level down")]
    modules = {f for f, _ in re.findall(r"`([\w/.]+\.py):([\w.]+)`", table)}
    assert 0 < len(modules) <= 8, sorted(modules)
    assert len(README.read_bytes()) <= 8 * 1024
