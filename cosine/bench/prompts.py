"""Built-in domain prompts for cosine-bench, used when no `cosine datasets build` prompt
set is given. Short, hand-written, and never part of any drafter's training text."""

from __future__ import annotations

import json
from pathlib import Path

BUILTIN: dict[str, list[str]] = {
    "code": [
        "def quicksort(items):\n    \"\"\"Sort a list with quicksort and return a new list.\"\"\"\n",
        "// Package stack implements a generic LIFO stack.\npackage stack\n\ntype Stack[T any] struct {\n",
        "fn parse_config(path: &std::path::Path) -> Result<Config, Error> {\n",
        "class LRUCache:\n    def __init__(self, capacity: int):\n",
    ],
    "docs": [
        "The :mod:`itertools` module implements a number of iterator building blocks. ",
        "NAME\n       grep - print lines that match patterns\n\nSYNOPSIS\n",
        "To create a virtual environment, run the venv module as a script with the directory path:",
    ],
    "prose": [
        "It is a truth universally acknowledged, that a single man in possession of a good fortune",
        "The storm had passed by morning, and the village woke to a sky washed clean.",
        "In the beginning God created the heaven and the earth. And the earth was",
    ],
    "german": [
        "Die Installation von Debian beginnt mit dem Herunterladen eines Abbilds. Danach",
        "Es war einmal ein kleines Dorf am Rande eines großen Waldes, in dem",
    ],
}
BUILTIN["mixed"] = [p for d in ("code", "docs", "prose", "german") for p in BUILTIN[d][:1]]


def load(domains: list[str], path: Path | None = None, per_domain: int = 0) -> list[tuple[str, str]]:
    """(domain, prompt) pairs. ``path`` is a prompts JSON from `cosine datasets build`:
    {"domain": ["prompt", ...]}; otherwise the built-in set."""
    source = json.loads(Path(path).read_text()) if path else BUILTIN
    out = []
    for d in domains:
        if d not in source:
            raise SystemExit(f"cosine-bench: no prompts for domain {d!r}; available: {', '.join(source)}")
        ps = source[d][:per_domain] if per_domain else source[d]
        out += [(d, p) for p in ps]
    return out
