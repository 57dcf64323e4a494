"""CoSine confidence-based token fusion (pure functions).

At every draft step each selected drafter proposes a token with its own probability
(optionally with its top-k alternatives as extra candidates). All candidates join the
request's token tree as children of the current fused node; a fusion rule picks the one
token all drafters continue from. Repeated over steps this builds the CoSine tree: the
fused tokens form a path, the losing candidates hang off it as leaves.

The paper does not publish an exact formula, so rules are pluggable and named.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import numpy as np

from cosine.tree import TokenTree


@dataclass(frozen=True)
class Candidate:
    drafter: int
    token: int
    prob: float  # the drafter's own probability of the token (its confidence)


@dataclass(frozen=True)
class DraftStep:
    """One draft step: every selected drafter's proposal (plus any top-k extras)."""

    candidates: tuple[Candidate, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", tuple(self.candidates))  # accept lists too


FusionRule = Callable[[Sequence[Candidate]], "Candidate | None"]


def max_confidence(cands: Sequence[Candidate]) -> Candidate | None:
    """The single most confident candidate (ties: lower drafter index, then lower token)."""
    if not cands:
        return None
    return min(cands, key=lambda c: (-c.prob, c.drafter, c.token))


def _by_token(cands: Sequence[Candidate]) -> dict[int, dict[int, float]]:
    """token -> {drafter: prob}; a drafter counted once per token (its highest prob)."""
    out: dict[int, dict[int, float]] = defaultdict(dict)
    for c in cands:
        out[c.token][c.drafter] = max(c.prob, out[c.token].get(c.drafter, float("-inf")))
    return out


def _pick(cands: Sequence[Candidate], score: Callable[[dict[int, float]], float]) -> Candidate | None:
    """Token with the best ``score`` over its {drafter: prob}; returned as a Candidate whose
    drafter is that token's most confident proposer and whose prob is the score (the
    confidence compared with the cut-off). Ties: lower drafter index, then lower token."""
    if not cands:
        return None
    best = None
    for tok, by_d in _by_token(cands).items():
        d = min(by_d, key=lambda k: (-by_d[k], k))
        key = (-score(by_d), min(by_d), tok)
        if best is None or key < best[0]:
            best = (key, Candidate(d, tok, float(score(by_d))))
    return best[1]


def prob_sum(cands: Sequence[Candidate]) -> Candidate | None:
    """Token with the largest probability summed over the drafters proposing it."""
    return _pick(cands, lambda by_d: sum(by_d.values()))


def vote(cands: Sequence[Candidate]) -> Candidate | None:
    """Token proposed by the most drafters; ties by summed probability. The returned prob
    is the mean probability of its proposers (a confidence in [0, 1] for the cut-off)."""
    if not cands:
        return None
    by_tok = _by_token(cands)
    tok = min(by_tok, key=lambda t: (-len(by_tok[t]), -sum(by_tok[t].values()), min(by_tok[t]), t))
    by_d = by_tok[tok]
    d = min(by_d, key=lambda k: (-by_d[k], k))
    return Candidate(d, tok, float(np.mean(list(by_d.values()))))


FUSION_RULES: dict[str, FusionRule] = {"max": max_confidence, "prob_sum": prob_sum, "vote": vote}


def make_rule(name: str, min_confidence: float = 0.0) -> FusionRule:
    """Named rule with a confidence cut-off: if the winner's confidence is below
    ``min_confidence`` the rule returns None (stop drafting this request this round)."""
    if name not in FUSION_RULES:
        raise ValueError(f"unknown fusion rule {name!r}; known rules: {sorted(FUSION_RULES)}")
    if not min_confidence >= 0.0:  # also rejects NaN
        raise ValueError(f"min_confidence must be >= 0, got {min_confidence}")
    base = FUSION_RULES[name]
    if min_confidence == 0.0:
        return base

    def rule(cands: Sequence[Candidate]) -> Candidate | None:
        win = base(cands)
        return None if win is None or win.prob < min_confidence else win

    rule.__name__ = f"{name}>={min_confidence}"
    return rule


def weighted(rule: FusionRule, weights: Mapping[int, float] | None) -> FusionRule:
    """Scale each candidate's confidence by its drafter's weight before ``rule`` decides.

    Raw probabilities are not comparable across drafter kinds (a prompt-lookup match
    count is not a model probability), so the controller passes the router's per-request
    scores, which track how often each drafter's tokens were accepted. Only the choice of
    the fused token changes; the tree keeps the drafters' own probabilities.
    """
    if not weights:
        return rule

    def w_rule(cands: Sequence[Candidate]) -> Candidate | None:
        return rule([Candidate(c.drafter, c.token, c.prob * weights.get(c.drafter, 1.0)) for c in cands])

    w_rule.__name__ = f"weighted({getattr(rule, '__name__', 'rule')})"
    return w_rule


class Calibration:
    """P(the target agrees with a drafter's token | drafter, domain, its stated probability),
    learned from verified trees: the confidence fusion compares.

    Drafters' own probabilities are not comparable across kinds (a model's softmax, an
    n-gram's count share, a prompt-lookup match share), and a model can be over-confident
    off its domain. Every verified candidate is a labelled example: the target's argmax at
    the candidate's parent equals its token or not, whichever branch the round committed.
    Per (domain, drafter) and probability bin the estimate is (hits + prior * p) /
    (trials + prior): the stated p until evidence accumulates. Bins halve their counts past
    ``cap`` trials, so the estimate keeps following a drifting workload. Pure state, no I/O.
    """

    def __init__(self, edges: Sequence[float] = (0.1, 0.25, 0.4, 0.55, 0.7, 0.85, 0.95),
                 prior: float = 4.0, cap: float = 2000.0):
        if list(edges) != sorted(edges) or not all(0.0 < e < 1.0 for e in edges):
            raise ValueError(f"Calibration: edges must be increasing inside (0, 1), got {list(edges)}")
        if prior <= 0.0 or cap <= 0.0:
            raise ValueError(f"Calibration: prior and cap must be > 0, got {prior}, {cap}")
        self.edges = np.asarray(edges, np.float64)
        self.prior, self.cap = float(prior), float(cap)
        self._hits: dict[tuple[str, int], np.ndarray] = {}
        self._trials: dict[tuple[str, int], np.ndarray] = {}

    def _bin(self, prob: float) -> int:
        return int(np.searchsorted(self.edges, min(1.0, max(0.0, float(prob))), side="right"))

    def observe(self, domain: str, drafter: int, prob: float, agreed: bool) -> None:
        key = (domain, int(drafter))
        if key not in self._hits:
            self._hits[key] = np.zeros(self.edges.size + 1)
            self._trials[key] = np.zeros(self.edges.size + 1)
        b = self._bin(prob)
        self._hits[key][b] += 1.0 if agreed else 0.0
        self._trials[key][b] += 1.0
        if self._trials[key][b] > self.cap:
            self._hits[key][b] /= 2.0
            self._trials[key][b] /= 2.0

    def confidence(self, domain: str, drafter: int, prob: float) -> float:
        key = (domain, int(drafter))
        p = min(1.0, max(0.0, float(prob)))
        if key not in self._hits:
            return p
        b = self._bin(p)
        return float((self._hits[key][b] + self.prior * p) / (self._trials[key][b] + self.prior))

    def table(self) -> dict[str, dict[int, list[tuple[float, int]]]]:
        """domain -> drafter -> per bin (agreement rate, trials); for stats and docs."""
        out: dict[str, dict[int, list[tuple[float, int]]]] = {}
        for (dom, d), h in self._hits.items():
            t = self._trials[(dom, d)]
            out.setdefault(dom, {})[d] = [(round(float(hh / tt), 3) if tt else -1.0, int(tt)) for hh, tt in zip(h, t)]
        return out

    def rule(self, rule: FusionRule, domain: str) -> FusionRule:
        """``rule`` deciding on calibrated confidences (the tree keeps the drafters' own)."""
        def c_rule(cands: Sequence[Candidate]) -> Candidate | None:
            return rule([Candidate(c.drafter, c.token, self.confidence(domain, c.drafter, c.prob)) for c in cands])

        c_rule.__name__ = f"calibrated({getattr(rule, '__name__', 'rule')})"
        return c_rule


def fuse_step(tree: TokenTree, parent: int, step: DraftStep, rule: FusionRule,
              keep_on_stop: bool = True) -> tuple[TokenTree, int | None]:
    """Add every candidate of ``step`` as a child of ``parent`` and return (tree, fused node).

    Candidates with equal tokens share one node (prefix-trie; the node records its most
    confident proposer, see ``TokenTree.add``). The fused node is the node of the rule's
    winning token, or None when the rule says stop; with ``keep_on_stop=False`` a stop also
    leaves the tree unchanged (the low-confidence candidates are not worth verifying).
    """
    win = rule(step.candidates)
    if win is None and not keep_on_stop:
        return tree, None
    node_of: dict[int, int] = {}
    for c in step.candidates:
        tree, node_of[c.token] = tree.add(parent, c.token, c.drafter, c.prob)
    if win is None:
        return tree, None
    if win.token not in node_of:
        raise ValueError(f"fusion rule returned token {win.token}, which no candidate proposed")
    return tree, node_of[win.token]
