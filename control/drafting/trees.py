"""Drafts as token trees: the draft phase's typed hand-off (``Draft``, ``Proposal``) and
the pure glue from drafter outputs to trees (no actors, no I/O).

Greedy trees may merge equal siblings (verify_greedy only asks "is the argmax among the
children"). Stochastic trees must NOT: multi-step speculative sampling tests every
drafter's sample as its own attempt against that drafter's q, so equal tokens from
different drafters stay separate children (``add_child`` below never deduplicates).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cosine.tree import TokenTree, merge_trees

from .fusion import Candidate, DraftStep, fuse_step


@dataclass(frozen=True)
class Proposal:
    """One drafter's candidate token at one tree position: fusion weighs it, and once the
    target has scored the tree it labels the drafter (routing, calibration)."""

    drafter: int                  # drafter index
    token: int
    prob: float                   # the drafter's own probability of the token
    parent: int                   # the tree node it continues
    q: np.ndarray | None = None   # the drafter's distribution there (sampling)


@dataclass
class Draft:
    """One request's drafted tree, from the draft phase to verification and commit. A
    request that does not speculate this round has the root alone (a plain step)."""

    tree: TokenTree
    dists: dict = field(default_factory=dict)      # (drafter, parent node) -> q, for verify_stochastic
    drafters: list[str] = field(default_factory=list)  # the drafters that drafted (names)
    # drafter name -> its chain this round (tokens, probs): credit by match when no labels
    proposals: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)
    labels: list[Proposal] = field(default_factory=list)  # routed rounds: every candidate drafted
    routed: list[str] = field(default_factory=list)       # the drafters the router picked
    draft_s: float = 0.0      # drafting wall time (the drafters' prompt prefill left out)
    overlap_s: float = 0.0    # the part of draft_s hidden behind verification (pipelining)

    @classmethod
    def root(cls, token: int) -> "Draft":
        return cls(root_tree(token))

    def keep(self, kept: np.ndarray) -> int:
        """Prune the tree to the ancestor-closed nodes ``kept`` (old indices, root
        included); candidate labels follow the renumbering (a dropped candidate whose
        parent stays is still labelled: the target scores its parent either way).
        Greedy drafts only: sampling's ``dists`` are keyed by the old indices. Returns
        the nodes dropped."""
        kept = np.asarray(kept, np.int64)
        dropped = self.tree.n - kept.size
        if dropped:
            new = {int(o): i for i, o in enumerate(kept)}
            self.tree = self.tree.subtree(kept)
            self.labels = [Proposal(p.drafter, p.token, p.prob, new[p.parent], p.q)
                           for p in self.labels if p.parent in new]
        return dropped


def root_tree(root: int) -> TokenTree:
    return TokenTree.root(int(root))


def add_child(tree: TokenTree, parent: int, token: int, proposer: int, prob: float) -> tuple[TokenTree, int]:
    """Append a child without merging it into an equal sibling (exact for sampling)."""
    return tree.add(parent, int(token), int(proposer), float(prob), merge=False)


@dataclass
class ChainDraft:
    """One drafter's k-token draft after the root, with optional top-k siblings per step."""
    drafter: int
    tokens: list[int]
    probs: list[float]
    topk_ids: np.ndarray | None = None     # [k, topk]
    topk_probs: np.ndarray | None = None
    dists: np.ndarray | None = None        # [k, V] drafter distributions (sampling)


@dataclass
class Drafted:
    tree: TokenTree
    dists: dict = field(default_factory=dict)  # (drafter, parent node) -> q, for verify_stochastic


def chains_tree(root: int, chains: list[ChainDraft], stochastic: bool, width: int = 1) -> Drafted:
    """Tree of one or more drafters' chains (speculative / specinfer modes)."""
    if not stochastic:
        trees = []
        for c in chains:
            toks = [int(x) for x in c.tokens]
            if width > 1 and c.topk_ids is not None:
                trees.append(TokenTree.from_expansion(int(root), toks, np.asarray(c.topk_ids)[:, :width],
                                                      np.asarray(c.topk_probs)[:, :width], c.drafter,
                                                      chain_probs=[float(x) for x in c.probs]))
            else:
                trees.append(TokenTree.from_chain(int(root), toks, c.drafter, [float(x) for x in c.probs]))
        return Drafted(merge_trees(trees) if len(trees) > 1 else (trees[0] if trees else root_tree(root)))
    tree, dists = root_tree(root), {}
    for c in chains:
        parent = 0
        for j, (tok, p) in enumerate(zip(c.tokens, c.probs)):
            if c.dists is not None:
                dists[(c.drafter, parent)] = c.dists[j]
            tree, parent = add_child(tree, parent, tok, c.drafter, p)
    return Drafted(tree, dists)


def fuse_candidates(tree: TokenTree, parent: int, proposals: list[Proposal],
                    rule, stochastic: bool, dists: dict) -> tuple[TokenTree, int | None]:
    """One fusion step: every proposal enters the tree as a child of ``parent``; returns
    the fused node the drafters continue from (None = stop)."""
    step = DraftStep([Candidate(p.drafter, int(p.token), float(p.prob)) for p in proposals])
    if not stochastic:
        return fuse_step(tree, parent, step, rule)
    # Sampling: the same rule picks the winner, but every attempt stays its own child.
    win = rule(step.candidates)
    win_node = None
    for p in proposals:
        if p.q is not None:
            dists[(p.drafter, parent)] = p.q
        tree, node = add_child(tree, parent, p.token, p.drafter, p.prob)
        if win is not None and win_node is None and p.token == win.token:
            win_node = node
    return tree, win_node


def agreement(labels: list[Proposal], target_argmax: np.ndarray) -> list[tuple[int, float, bool]]:
    """Label every drafted candidate: (drafter, prob, did the target's argmax after the
    candidate's parent equal its token?). The tree forward scores every node, so each
    candidate is judged on its own prefix whether or not that branch won. These are the
    examples calibration and routing learn from."""
    am = np.asarray(target_argmax).reshape(-1)
    return [(int(p.drafter), float(p.prob), bool(0 <= p.parent < am.size and int(am[p.parent]) == int(p.token)))
            for p in labels]
