"""Every example command in README.md and docs/*.md uses only options that exist: each
`cosine ...` / `cosine-... ` command found in a code block or an inline code span is
resolved to its real argparse parser (through `cosine --help` of that subcommand), and
each of its --options must be one that parser lists."""

from __future__ import annotations

import contextlib
import functools
import io
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SCRIPTS = {"cosine-export": "export", "cosine-worker": "worker", "cosine-serve": "serve", "cosine-bench": "bench",
           "cosine-distill": "distill"}
TOP = ("export", "worker", "serve", "up", "generate", "models", "keys", "bench", "datasets", "distill")
NESTED = {"models": ("fetch", "list", "path"), "keys": ("generate",),
          "bench": ("run", "worker", "drafters", "load", "report", "pool", "chaos", "profile")}
# a program name that starts a command: at the start, after a separator, or as a path's last part
PROGRAM = re.compile(r"(?:^|(?<=[\s`=(]))(?:[\w.~/-]*/)?(cosine(?:-export|-worker|-serve|-bench|-distill)?)(?=\s|$)")
OPTION = re.compile(r"(?<![\w-])(--[a-z0-9][a-z0-9-]*)")


def _snippets(text: str) -> list[tuple[int, str]]:
    """(line, text) of every logical code line and inline code span."""
    out, in_block, pending, start = [], False, "", 0
    for n, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_block = not in_block
            continue
        if in_block:
            start = start or n
            pending += line.rstrip().removesuffix("\\") + " "
            if not line.rstrip().endswith("\\"):
                out.append((start, pending))
                pending, start = "", 0
        else:
            out += [(n, span) for span in re.findall(r"`([^`]+)`", line)]
    return out


def commands(path: Path) -> list[tuple[int, list[str]]]:
    """(line, argv) of every cosine command in one Markdown file."""
    found = []
    for n, snippet in _snippets(path.read_text()):
        snippet = re.sub(r"(^|\s)#.*$", "", snippet)  # shell comment
        for part in re.split(r"\s(?:&&|\|\||;|\|)\s", snippet):
            m = PROGRAM.search(part)
            before = part[:m.start()].split() if m else []
            if m is None or (before and before[-1].startswith("-")):  # a path given as an option's value
                continue
            found.append((n, [m.group(1), *part[m.end():].split()]))
    return found


def subcommand(argv: list[str]) -> tuple[str, ...]:
    """The `cosine` subcommand path an example runs: ("up",), ("bench", "load"), ..."""
    words = ([SCRIPTS[argv[0]]] if argv[0] in SCRIPTS else []) + [a for a in argv[1:]]
    if not words or words[0] not in TOP:
        return ()
    path = (words[0],)
    if words[0] in NESTED:
        nxt = words[1] if len(words) > 1 and words[1] in NESTED[words[0]] else None
        path += (nxt or ("run" if words[0] == "bench" else ""),)
    if path == ("bench", "run") and "--api" in words[:-1]:  # `cosine-bench run --api X` has a parser of its own
        path += ("--api", words[words.index("--api") + 1])
    return tuple(p for p in path if p)


@functools.cache
def options_of(path: tuple[str, ...]) -> frozenset[str]:
    from cosine.cli import main

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf), pytest.raises(SystemExit):
        main([*path, "--help"])
    return frozenset(OPTION.findall(buf.getvalue())) | {"--help"}


def test_every_documented_option_exists():
    bad, checked = [], 0
    for doc in DOCS:
        for line, argv in commands(doc):
            path = subcommand(argv)
            if not path:  # `cosine` alone, or a subcommand word that is a placeholder
                continue
            opts = {o.split("=")[0] for o in OPTION.findall(" ".join(argv[1:]).replace("[", " ").replace("]", " "))}
            unknown = sorted(opts - options_of(path))
            checked += 1
            if unknown:
                bad.append(f"{doc.relative_to(ROOT)}:{line}: `{' '.join(argv)}`: "
                           f"`cosine {' '.join(path)}` has no {', '.join(unknown)}")
    assert checked > 40, checked
    assert not bad, "documented options that do not exist:\n" + "\n".join(bad)


def test_the_checker_finds_commands_and_wrong_options(tmp_path):
    doc = tmp_path / "x.md"
    doc.write_text("Run `cosine generate \"hi\" --stream`.\n\n```bash\n"
                   "cosine up --config c.toml \\\n    --hosts a=b --remote-worker /srv/.venv/bin/cosine-worker  # x\n"
                   "ExecStart=/srv/.venv/bin/cosine-serve --config c.toml --connect-timeout 5\n```\n")
    got = commands(doc)
    assert [(n, a[0]) for n, a in got] == [(1, "cosine"), (4, "cosine"), (6, "cosine-serve")]
    assert subcommand(got[0][1]) == ("generate",) and "--stream" not in options_of(("generate",))
    assert "--remote-worker" in options_of(subcommand(got[1][1]))
    assert subcommand(["cosine-bench", "--prompts", "x"]) == ("bench", "run")
    assert subcommand(["cosine-bench", "chaos"]) == ("bench", "chaos")
    assert subcommand(["cosine-bench", "run", "--api", "openai", "--mode", "x"]) == ("bench", "run", "--api", "openai")
    assert "--mode" in options_of(("bench", "run", "--api", "openai")) and "--mode" not in options_of(("bench", "run"))
