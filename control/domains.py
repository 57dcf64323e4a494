"""Prompt -> domain classification for the router's per-domain priors.

The router only needs a cheap, deterministic guess of which specialist drafter a prompt
suits; a wrong guess costs a few exploration rounds, not correctness. Anything with a
``classify(text) -> str`` method can replace the default keyword classifier.
"""

from __future__ import annotations

import re
from collections import Counter
from typing import Mapping, Protocol, Sequence, Union, runtime_checkable

# A domain's markers: plain keywords (weight 1) or keyword -> weight.
Markers = Union[Sequence[str], Mapping[str, float]]


@runtime_checkable
class DomainClassifier(Protocol):
    def classify(self, text: str) -> str: ...


_WORD = re.compile(r"\w+")
_IS_WORD = re.compile(r"^\w+$")

# Default markers. Weights express how specific a marker is: symbols such as "::" or
# "|-" almost never occur outside their domain, English function words occur everywhere
# (so they are weak and only win on text with no stronger marker).
DEFAULT_DOMAINS: dict[str, dict[str, float]] = {
    "code": {
        **dict.fromkeys(["def", "return", "func", "fn", "class", "import", "from", "self", "struct",
                         "impl", "let", "const", "var", "package", "type", "int", "void", "elif",
                         "lambda", "async", "await", "pub", "mut", "None", "null", "nil", "__init__",
                         "println", "printf", "std"], 2.0),
        **dict.fromkeys(["{", "}", ";", "::", ":=", "->", "=>", "==", "!=", "//", "/*", "#include",
                         "):", '"""', "[]", "()", "&&", "||", "+="], 2.0),
        **dict.fromkeys(["(", ")", "[", "]"], 0.5),
    },
    "docs": {
        **dict.fromkeys([":mod:", ":func:", ":class:", ":meth:", ".. ", "NAME", "SYNOPSIS",
                         "DESCRIPTION", "OPTIONS", "Parameters", "Returns", "----", "```", "## "], 3.0),
        **dict.fromkeys(["function", "returns", "module", "modules", "install", "installation",
                         "command", "commands", "option", "options", "usage", "example", "examples",
                         "directory", "script", "argument", "arguments", "default", "documentation",
                         "parameter", "print", "environment", "configure", "configuration",
                         "manual", "run", "see", "also"], 2.0),
    },
    "prose": dict.fromkeys(
        ["the", "and", "of", "a", "to", "in", "that", "was", "he", "she", "it", "his", "her", "had",
         "with", "for", "as", "is", "by", "on", "not", "but", "were", "they", "we", "be", "this",
         "which", "at", "from", "i", "you", "my", "said", "when", "there", "their", "been", "would"],
        0.5),
    "german": {
        **dict.fromkeys(["der", "die", "das", "und", "nicht", "ist", "ein", "eine", "einer", "eines",
                         "einem", "mit", "dem", "den", "von", "zu", "auf", "für", "war", "es", "sich",
                         "auch", "wird", "werden", "sind", "nach", "danach", "aber", "wenn", "oder",
                         "ich", "wir", "sie", "am", "im", "des", "einmal", "kann"], 1.0),
        **dict.fromkeys(["ä", "ö", "ü", "ß", "Ä", "Ö", "Ü"], 1.0),
    },
    "math": {
        **dict.fromkeys(["|-", "$p", "$e", "$a", "$.", "$=", "\\frac", "\\sum", "\\int", "\\forall",
                         "\\exists", "\\in", "\\le", "\\ge", "\\cdot", "^{", "_{"], 3.0),
        **dict.fromkeys(["theorem", "proof", "lemma", "qed", "wff", "axiom", "corollary", "hypothesis",
                         "prove", "integer", "equation"], 2.0),
        **dict.fromkeys(["=", "+", "^", "$"], 0.25),
    },
}


class KeywordClassifier:
    """Scores each domain by weighted marker counts; the best domain wins.

    A marker made only of word characters is matched as a whole word (case-insensitive
    when written in lower case, case-sensitive otherwise, so "NAME" does not fire on
    ``name``); any other marker is a character n-gram counted as a substring.
    Ties go to the domain declared first. A best score below ``min_score`` gives
    ``default`` (empty or marker-free text).
    """

    def __init__(self, domains: Mapping[str, Markers] | None = None, default: str = "general",
                 min_score: float = 1.0):
        spec = DEFAULT_DOMAINS if domains is None else domains
        self.default = default
        self.min_score = float(min_score)
        # per domain: (lowercase words, case-sensitive words, substrings), each marker -> weight
        self._domains: list[tuple[str, dict[str, float], dict[str, float], dict[str, float]]] = []
        for name, markers in spec.items():
            weights = dict(markers) if isinstance(markers, Mapping) else dict.fromkeys(markers, 1.0)
            lower, exact, subs = {}, {}, {}
            for m, w in weights.items():
                if not m:
                    continue
                if not _IS_WORD.match(m):
                    subs[m] = float(w)
                elif m == m.lower():
                    lower[m] = float(w)
                else:
                    exact[m] = float(w)
            self._domains.append((name, lower, exact, subs))

    @property
    def domains(self) -> list[str]:
        return [d[0] for d in self._domains]

    def scores(self, text: str) -> dict[str, float]:
        words = Counter(_WORD.findall(text))
        lower = Counter()
        for w, n in words.items():
            lower[w.lower()] += n
        out = {}
        for name, lw, ex, subs in self._domains:
            s = sum(w * lower[m] for m, w in lw.items())
            s += sum(w * words[m] for m, w in ex.items())
            s += sum(w * text.count(m) for m, w in subs.items())
            out[name] = s
        return out

    def classify(self, text: str) -> str:
        best, best_s = self.default, float("-inf")
        for name, s in self.scores(text).items():  # declaration order: first wins ties
            if s > best_s:
                best, best_s = name, s
        return best if best_s >= self.min_score else self.default
