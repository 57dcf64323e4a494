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
