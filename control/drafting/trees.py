"""Pure glue between drafter outputs, token trees and verification (no actors, no I/O).

Greedy trees may merge equal siblings (verify_greedy only asks "is the argmax among the
children"). Stochastic trees must NOT: multi-step speculative sampling tests every
drafter's sample as its own attempt against that drafter's q, so equal tokens from
different drafters stay separate children (``add_child`` below never deduplicates).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from cosine.tree import TokenTree, merge_trees

from ..verify import VerifyResult, target_distribution, verify_greedy, verify_stochastic
from .fusion import Candidate, DraftStep, fuse_step


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


def fuse_candidates(tree: TokenTree, parent: int, cands: list[tuple[int, int, float, np.ndarray | None]],
                    rule, stochastic: bool, dists: dict) -> tuple[TokenTree, int | None]:
    """One fusion step: every candidate (drafter, token, prob, q) enters the tree as a child
    of ``parent``; returns the fused node the drafters continue from (None = stop)."""
    step = DraftStep([Candidate(d, int(t), float(p)) for d, t, p, _ in cands])
    if not stochastic:
        return fuse_step(tree, parent, step, rule)
    # Sampling: the same rule picks the winner, but every attempt stays its own child.
    win = rule(step.candidates)
    win_node = None
    for d, t, p, q in cands:
        if q is not None:
            dists[(d, parent)] = q
        tree, node = add_child(tree, parent, t, d, p)
        if win is not None and win_node is None and t == win.token:
            win_node = node
    return tree, win_node


def verify(tree: TokenTree, argmax: np.ndarray, logits: np.ndarray | None, temperature: float, top_p: float,
           dists: dict, rng: np.random.Generator) -> VerifyResult:
    if temperature <= 0 or logits is None:
        return verify_greedy(tree, argmax)
    return verify_stochastic(tree, target_distribution(logits, temperature, top_p), dists, rng)


def agreement(cands: list[tuple[int, float, int, int]], target_argmax: np.ndarray) -> list[tuple[int, float, bool]]:
    """Label every drafted candidate (drafter, prob, token, parent node): did the target's
    argmax after the candidate's parent equal its token? The tree forward scores every
    node, so each candidate is judged on its own prefix whether or not that branch won.
    These are the examples calibration and routing learn from."""
    am = np.asarray(target_argmax).reshape(-1)
    return [(int(d), float(p), bool(0 <= u < am.size and int(am[u]) == int(t))) for d, p, t, u in cands]
