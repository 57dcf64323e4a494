"""Prompt -> domain classification for the router's per-domain priors.

The router only needs a cheap, deterministic guess of which specialist drafter a prompt
suits; a wrong guess costs a few exploration rounds, not correctness. Anything with a
``classify(text) -> str`` method can replace the default keyword classifier.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from pathlib import Path
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


# Words, and runs of up to three symbols ("::", "..", "*/"): code and markup live in the
# symbols, prose and German in the words.
_TOKEN = re.compile(r"\w+|[^\w\s]{1,3}")


def features(text: str) -> Counter:
    """Token unigrams and adjacent token pairs of ``text`` (the naive Bayes features)."""
    toks = _TOKEN.findall(text)
    out = Counter(toks)
    out.update(f"{a} {b}" for a, b in zip(toks, toks[1:]))
    return out


def sample_text(path: str | Path, sample_bytes: int, slices: int = 16) -> str:
    """About ``sample_bytes`` of ``path`` read as ``slices`` evenly spaced pieces: a corpus
    that concatenates sources (Go, then Rust, then Python) is sampled across all of them."""
    size = Path(path).stat().st_size
    if size <= sample_bytes:
        return Path(path).read_text(encoding="utf-8", errors="replace")
    step, piece = size // slices, sample_bytes // slices
    with open(path, "rb") as f:
        parts = []
        for i in range(slices):
            f.seek(i * step)
            parts.append(f.read(piece).decode("utf-8", errors="replace"))
    return "\n".join(parts)


class NgramClassifier:
    """Multinomial naive Bayes over token unigrams and pairs, counted from one text corpus
    per domain: the prompt goes to the domain whose corpus makes its tokens likeliest.

    The corpora are the ones the domain n-gram drafters were counted from, so "which
    drafter's text does this prompt look like" is asked directly instead of through hand
    picked keywords (which sent 10 of the 16 docs benchmark prompts, reST and man pages
    full of English, to prose or code). Each domain keeps its ``vocab`` most frequent
    features; a feature unseen in a domain gets the smoothed share of an unseen one.
    Features no domain kept are ignored, and text with none gives ``default``.
    """

    def __init__(self, counts: Mapping[str, Counter], vocab: int = 20000, smoothing: float = 0.1,
                 default: str = "general"):
        if not counts:
            raise ValueError("NgramClassifier: need at least one domain's counts")
        if vocab < 1 or smoothing <= 0.0:
            raise ValueError(f"NgramClassifier: need vocab >= 1 and smoothing > 0, got {vocab}, {smoothing}")
        self.default = default
        kept = {d: dict(c.most_common(vocab)) for d, c in counts.items()}
        size = len(set().union(*kept.values()))
        self._logp: dict[str, dict[str, float]] = {}
        self._unseen: dict[str, float] = {}
        for d, top in kept.items():
            denom = math.log(sum(counts[d].values()) + smoothing * size)
            self._logp[d] = {f: math.log(n + smoothing) - denom for f, n in top.items()}
            self._unseen[d] = math.log(smoothing) - denom

    @classmethod
    def from_corpora(cls, corpora: Mapping[str, Sequence[str | Path]], sample_bytes: int = 1_000_000,
                     **kw) -> "NgramClassifier":
        """Count each domain's features from about ``sample_bytes`` of its corpus files."""
        counts: dict[str, Counter] = {}
        for dom, paths in corpora.items():
            c = counts.setdefault(dom, Counter())
            for p in paths:
                c.update(features(sample_text(p, max(1, sample_bytes // len(paths)))))
        return cls(counts, **kw)

    @property
    def domains(self) -> list[str]:
        return list(self._logp)

    def scores(self, text: str) -> dict[str, float]:
        """Log-likelihood of ``text``'s known features under each domain."""
        fs = [(f, n) for f, n in features(text).items() if any(f in lp for lp in self._logp.values())]
        return {d: sum(n * lp.get(f, self._unseen[d]) for f, n in fs) for d, lp in self._logp.items()} if fs else {}

    def classify(self, text: str) -> str:
        s = self.scores(text)
        return max(s, key=lambda d: (s[d], -self.domains.index(d))) if s else self.default


def make_classifier(name: str, corpora: Mapping[str, Sequence[str | Path]]) -> DomainClassifier:
    """The configured classifier: "ngram" over ``corpora`` (domain -> text files), or the
    keyword classifier when asked for or when there is no corpus to count."""
    if name == "ngram" and corpora:
        return NgramClassifier.from_corpora(corpora)
    return KeywordClassifier()
