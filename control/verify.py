"""Token-tree verification (SpecInfer), pure numpy.

``target_*[u]`` always means the target's next-token output after S_u (the tokens from
the committed prefix through node u), i.e. the logits row of node u in the tree forward.
Both verifiers return the accepted path (root first) and the tokens to commit: the
accepted drafted tokens followed by one token sampled/argmaxed by the target, which
becomes the next tree's root.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Mapping

import numpy as np

from cosine.tree import TokenTree


@dataclass(frozen=True)
class VerifyResult:
    nodes: list[int]              # accepted node indices, root first
    tokens: np.ndarray            # int64: accepted drafted tokens + the bonus/correction token
    n_accepted: int               # drafted tokens accepted = len(nodes) - 1
    accepted_by: dict[int, int]   # drafter -> accepted nodes it proposed (routing credit)


def _result(tree: TokenTree, nodes: list[int], last: int) -> VerifyResult:
    drafted = tree.tokens[nodes[1:]].tolist()
    credit = Counter(int(tree.proposers[u]) for u in nodes[1:])
    return VerifyResult(nodes=nodes, tokens=np.asarray(drafted + [int(last)], dtype=np.int64),
                        n_accepted=len(nodes) - 1, accepted_by=dict(credit))


# ----- greedy ------------------------------------------------------------------------------

def verify_greedy(tree: TokenTree, target_argmax: np.ndarray) -> VerifyResult:
    """Walk from the root while some child carries the target's argmax at the current node
    (the lowest-index such child if a tree holds equal siblings); the argmax at the last
    accepted node is the bonus token. The committed tokens equal greedy decoding."""
    am = np.asarray(target_argmax).reshape(-1)
    if am.size != tree.n:
        raise ValueError(f"target_argmax has {am.size} entries for a {tree.n}-node tree")
    kids, toks = tree.children_lists(), tree.tokens
    nodes, u = [0], 0
    while True:
        nxt = next((c for c in kids[u] if toks[c] == am[u]), None)
        if nxt is None:
            return _result(tree, nodes, int(am[u]))
        nodes.append(nxt)
        u = nxt


# ----- target distribution -----------------------------------------------------------------

def target_distribution(logits: np.ndarray, temperature: float, top_p: float = 1.0) -> np.ndarray:
    """float64 probabilities over the last axis: softmax(logits / temperature), then the
    nucleus (smallest set of most likely tokens with mass >= top_p, ties by lower id)
    renormalized. Greedy (temperature 0) is verify_greedy's job, not a distribution."""
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0 for a sampling distribution, got {temperature}")
    if not 0.0 < top_p <= 1.0:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    z = np.asarray(logits, dtype=np.float64) / float(temperature)
    m = np.max(z, axis=-1, keepdims=True)
    if not np.all(np.isfinite(m)):
        raise ValueError("logits rows must have a finite maximum (no NaN, not all -inf)")
    p = np.exp(z - m)  # stable: the largest term is exp(0) = 1
    p /= p.sum(axis=-1, keepdims=True)
    if top_p < 1.0:
        order = np.argsort(-p, axis=-1, kind="stable")
        sp = np.take_along_axis(p, order, axis=-1)
        before = np.cumsum(sp, axis=-1) - sp          # mass of strictly more likely tokens
        # always keeps the most likely token; the slack stops rounding (0.5 + 0.3 summing to
        # 0.79999...) from pulling in one more token than "mass >= top_p" needs
        keep_sorted = before < top_p - 1e-9
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        p = np.where(keep, p, 0.0)
        p /= p.sum(axis=-1, keepdims=True)
    return p


# ----- stochastic (multi-step speculative sampling) ----------------------------------------

def _normalized(x: np.ndarray) -> np.ndarray | None:
    s = float(x.sum())
    return x / s if s > 0 else None


def _sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """Inverse-CDF draw; side='right' never returns a zero-probability token."""
    c = np.cumsum(p)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), p.size - 1))


def _accepts(rng: np.random.Generator, px: float, qx: float) -> bool:
    """Accept a draft token with probability min(1, p(x) / q(x)) (qx > 0)."""
    return rng.random() * qx < px


def _residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """normalize(max(0, p - q)). If that is all zero, p <= q everywhere, so p == q (both
    sum to 1) and the rejection that led here had probability 0 (it can only come from
    rounding); returning p itself is then the exact conditional distribution."""
    r = _normalized(np.maximum(p - q, 0.0))
    return p if r is None else r


def _drop(q: np.ndarray, x: int) -> np.ndarray | None:
    """Drafter q after sampling x without replacement: x removed, renormalized."""
    q = q.copy()
    q[x] = 0.0
    return _normalized(q)


def _trial_order(children: tuple[int, ...], proposers: np.ndarray, rng: np.random.Generator) -> list[int]:
    """Random order over drafters' attempts that keeps each drafter's own children in node
    (= draw) order: a drafter's later samples without replacement are only distributed as
    "q minus the earlier ones" when tested after them. The order never looks at tokens."""
    if len(children) == 1:
        return list(children)
    slots = [int(proposers[children[i]]) for i in rng.permutation(len(children))]
    queues: dict[int, list[int]] = {}
    for c in children:
        queues.setdefault(int(proposers[c]), []).append(c)
    return [queues[d].pop(0) for d in slots]


def verify_stochastic(tree: TokenTree, target_probs: np.ndarray,
                      draft_dists: Mapping[tuple[int, int], np.ndarray],
                      rng: np.random.Generator) -> VerifyResult:
    """SpecInfer multi-step speculative sampling over a token tree; the committed tokens
    are distributed exactly as sampling from the target.

    ``target_probs[u]``: the target's distribution after S_u. ``draft_dists[(d, u)]``: the
    distribution drafter d sampled its children of u from. Several children of u from one
    drafter must have been drawn WITHOUT replacement, in node order; children of a drafter
    with no entry at u are deterministic proposals (q = point mass on the token, exact).
    Equal tokens from different drafters may be separate children: each is its own attempt.
    """
    P = np.asarray(target_probs, dtype=np.float64)
    if P.ndim != 2 or P.shape[0] != tree.n:
        raise ValueError(f"target_probs must be [{tree.n}, V], got shape {P.shape}")
    V = P.shape[1]
    kids, toks, props = tree.children_lists(), tree.tokens, tree.proposers
    nodes, u = [0], 0
    while True:
        p = _normalized(P[u])
        if p is None:
            raise ValueError(f"target_probs[{u}] has no mass")
        if not kids[u]:
            return _result(tree, nodes, _sample(p, rng))  # leaf: bonus token from the target
        qs: dict[int, np.ndarray | None] = {}  # drafter -> its q at u, minus rejected draws
        accepted = None
        for s in _trial_order(kids[u], props, rng):
            d, x = int(props[s]), int(toks[s])
            if x >= V:
                raise ValueError(f"node {s} has token {x} outside the vocabulary of size {V}")
            if d not in qs:
                q0 = draft_dists.get((d, u))
                qs[d] = None if q0 is None else _normalized(np.asarray(q0, dtype=np.float64).reshape(-1))
                if q0 is not None and (qs[d] is None or qs[d].size != V):
                    raise ValueError(f"draft_dists[{(d, u)}] must be a length-{V} distribution with mass")
            q = qs[d]
            if q is None:  # deterministic proposal: q = delta_x
                qx = 1.0
            else:
                qx = float(q[x])
                if qx <= 0.0:
                    raise ValueError(f"node {s}: drafter {d} proposed token {x} with q = 0 at node {u}; "
                                     "it cannot have been sampled from that distribution")
            if _accepts(rng, float(p[x]), qx):
                accepted = s
                break
            if q is None:
                delta = np.zeros(V)
                delta[x] = 1.0
                p = _residual(p, delta)
            else:
                p = _residual(p, q)
                qs[d] = _drop(q, x)
                if qs[d] is None:  # support exhausted: a further child of d is impossible (raises)
                    qs[d] = np.zeros(V)
        if accepted is None:
            return _result(tree, nodes, _sample(p, rng))  # all rejected: correction token
        nodes.append(accepted)
        u = accepted


def accept(tree: TokenTree, argmax: np.ndarray, logits: np.ndarray | None, temperature: float, top_p: float,
           dists: Mapping, rng: np.random.Generator) -> VerifyResult:
    """The accepted path of a verified tree: greedy matching, or multi-step speculative
    sampling against the drafters' distributions ``dists`` when sampling."""
    if temperature <= 0 or logits is None:
        return verify_greedy(tree, argmax)
    return verify_stochastic(tree, target_distribution(logits, temperature, top_p), dists, rng)
