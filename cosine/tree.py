"""Token-tree topology as pure numpy functions.

A tree is given by ``parents`` (int array, node 0 is the root with parent -1 and every
other node's parent has a smaller index). These functions are shared by the verifier
worker (mask and positions for one forward) and the control plane (TokenTree).
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass
from functools import cached_property
from typing import Sequence

import numpy as np


class TreeError(ValueError):
    """A parents array that is not a valid topologically ordered tree."""


def validate_parents(parents: np.ndarray) -> np.ndarray:
    """Return ``parents`` as int64 or raise TreeError naming the first bad node.

    Requiring ``0 <= parents[i] < i`` excludes cycles, self-loops, forests and
    out-of-range parents in one check.
    """
    p = np.asarray(parents)
    if p.ndim != 1 or p.size == 0:
        raise TreeError(f"parents must be a non-empty 1-D array, got shape {p.shape}")
    if not np.issubdtype(p.dtype, np.integer):
        raise TreeError(f"parents must be integers, got {p.dtype}")
    p = p.astype(np.int64)
    if p[0] != -1:
        raise TreeError(f"node 0 is the root and must have parent -1, got {p[0]}")
    idx = np.arange(p.size)
    bad = np.nonzero((p[1:] < 0) | (p[1:] >= idx[1:]))[0]
    if bad.size:
        i = int(bad[0]) + 1
        raise TreeError(f"node {i} has parent {p[i]}; parents must satisfy 0 <= parent < node index")
    return p


def depths(parents: np.ndarray) -> np.ndarray:
    """Depth of every node (root = 0)."""
    p = validate_parents(parents)
    d = np.zeros(p.size, dtype=np.int64)
    for i in range(1, p.size):
        d[i] = d[p[i]] + 1
    return d


def ancestor_mask(parents: np.ndarray) -> np.ndarray:
    """bool [N, N]: row i is True at i and at every ancestor of i (tree attention)."""
    p = validate_parents(parents)
    n = p.size
    m = np.zeros((n, n), dtype=bool)
    for i in range(n):
        if i:
            m[i] = m[p[i]]
        m[i, i] = True
    return m


def position_ids(parents: np.ndarray, prefix_len: int) -> np.ndarray:
    """Position id of each node: committed prefix length + depth."""
    return depths(parents) + int(prefix_len)


def path_to(parents: np.ndarray, node: int) -> list[int]:
    """Node indices from the root to ``node``, root first."""
    p = validate_parents(parents)
    out = [int(node)]
    while p[out[-1]] != -1:
        out.append(int(p[out[-1]]))
    return out[::-1]


# ----- TokenTree ---------------------------------------------------------------------------

def _frozen(a: np.ndarray, dtype: type) -> np.ndarray:
    out = np.array(a, dtype=dtype, copy=True).reshape(-1)
    out.flags.writeable = False  # the dataclass is frozen; so are its arrays
    return out


@dataclass(frozen=True, eq=False)
class TokenTree:
    """One request's draft tree (see docs/design.md, "Token trees").

    Node 0 is the root = the last committed token; nodes are topologically ordered
    (``0 <= parents[i] < i``). ``proposers[i]`` is the drafter that proposed node i
    (-1 for the root) and ``probs[i]`` that drafter's probability of the token (1.0 for
    the root). Arrays are copied, coerced to the canonical dtypes and made read-only, so
    a tree never changes; every "mutating" method returns a new tree.
    """

    tokens: np.ndarray
    parents: np.ndarray
    proposers: np.ndarray | None = None
    probs: np.ndarray | None = None

    def __post_init__(self) -> None:
        parents = validate_parents(self.parents)
        n = parents.size
        tokens = np.asarray(self.tokens)
        proposers = np.full(n, 0, np.int32) if self.proposers is None else np.asarray(self.proposers)
        probs = np.ones(n, np.float32) if self.probs is None else np.asarray(self.probs)
        if self.proposers is None:
            proposers[0] = -1
        for name, a in (("tokens", tokens), ("proposers", proposers), ("probs", probs)):
            if a.ndim != 1 or a.size != n:
                raise TreeError(f"{name} must be 1-D with {n} entries like parents, got shape {a.shape}")
        if not np.issubdtype(tokens.dtype, np.integer) or (tokens < 0).any():
            raise TreeError("tokens must be non-negative integers")
        if not np.issubdtype(proposers.dtype, np.integer) or (proposers < -1).any():
            raise TreeError("proposers must be integers >= -1")
        if not np.all(np.isfinite(probs)) or (probs < 0).any():
            raise TreeError("probs must be finite and >= 0")
        object.__setattr__(self, "tokens", _frozen(tokens, np.int64))
        object.__setattr__(self, "parents", _frozen(parents, np.int64))
        object.__setattr__(self, "proposers", _frozen(proposers, np.int32))
        object.__setattr__(self, "probs", _frozen(probs, np.float32))

    # --- construction ---------------------------------------------------------------------

    @classmethod
    def root(cls, token: int) -> TokenTree:
        return cls(np.array([token]), np.array([-1]), np.array([-1]), np.array([1.0]))

    @classmethod
    def from_chain(cls, root: int, tokens: Sequence[int] | np.ndarray, proposer: int = 0,
                   probs: Sequence[float] | np.ndarray | None = None) -> TokenTree:
        """A single path root -> tokens[0] -> tokens[1] ... (probs default to 1.0)."""
        toks = np.asarray(tokens, dtype=np.int64).reshape(-1)
        k = toks.size
        pr = np.ones(k) if probs is None else np.asarray(probs, dtype=np.float64).reshape(-1)
        if pr.size != k:
            raise TreeError(f"from_chain: {k} tokens but {pr.size} probs")
        return cls(np.concatenate([[root], toks]), np.arange(-1, k),
                   np.concatenate([[-1], np.full(k, proposer)]), np.concatenate([[1.0], pr]))

    @classmethod
    def from_expansion(cls, root: int, chain_tokens: Sequence[int] | np.ndarray, topk_ids: np.ndarray,
                       topk_probs: np.ndarray, proposer: int = 0,
                       chain_probs: Sequence[float] | np.ndarray | None = None) -> TokenTree:
        """SpecInfer expansion of one drafter's chain.

        The chain is the main path; at step j the other top-w candidates ``topk_ids[j]``
        become sibling leaves of chain token j (children of chain node j-1). Ids < 0 are
        padding and skipped; duplicates of the chain token (or of each other) are merged.
        The chain token's prob is ``chain_probs[j]`` if given, else its entry in the top-k
        row (a chain token that is missing from its row then needs ``chain_probs``).
        """
        chain = np.asarray(chain_tokens, dtype=np.int64).reshape(-1)
        ids, pk = np.asarray(topk_ids), np.asarray(topk_probs, dtype=np.float64)
        if ids.ndim != 2 or ids.shape != pk.shape or ids.shape[0] != chain.size:
            raise TreeError(f"from_expansion: need topk_ids/topk_probs of shape [{chain.size}, w], "
                            f"got {ids.shape} and {pk.shape}")
        tree, parent = cls.root(root), 0
        for j, tok in enumerate(chain.tolist()):
            if chain_probs is not None:
                p = float(np.asarray(chain_probs, dtype=np.float64).reshape(-1)[j])
            else:
                hit = np.nonzero(ids[j] == tok)[0]
                if hit.size == 0:
                    raise TreeError(f"from_expansion: chain token {tok} at step {j} is not in its top-k row; "
                                    "pass chain_probs")
                p = float(pk[j, hit[0]])
            tree, node = tree.add(parent, tok, proposer, p)
            for alt, ap in zip(ids[j].tolist(), pk[j].tolist()):
                if alt >= 0 and alt != tok:
                    tree, _ = tree.add(parent, alt, proposer, ap)
            parent = node
        return tree

    def add(self, parent: int, token: int, proposer: int, prob: float, merge: bool = True) -> tuple[TokenTree, int]:
        """Add ``token`` under ``parent``; return (new tree, its node index).

        Prefix-trie semantics (``merge=True``): if ``parent`` already has a child with this
        token, that node is returned instead of a duplicate. Its (proposer, prob) pair then
        becomes the more confident of the two (ties: lower drafter index), so a node's prob
        is always its recorded proposer's own probability. ``merge=False`` always appends
        (stochastic verification must test every drafter's sample as its own child).
        """
        # prob is compared at the stored float32 precision so equal inputs tie
        parent, token, proposer, prob = int(parent), int(token), int(proposer), float(np.float32(prob))
        if not 0 <= parent < self.n:
            raise TreeError(f"parent {parent} is not a node of a {self.n}-node tree")
        if merge:
            for c in self.children(parent):
                if self.tokens[c] == token:
                    old_p, old_d = float(self.probs[c]), int(self.proposers[c])
                    if (prob, -proposer) <= (old_p, -old_d):
                        return self, c
                    proposers, probs = self.proposers.copy(), self.probs.copy()
                    proposers[c], probs[c] = proposer, prob
                    return TokenTree(self.tokens, self.parents, proposers, probs), c
        return TokenTree(np.append(self.tokens, token), np.append(self.parents, parent),
                         np.append(self.proposers, proposer), np.append(self.probs, prob)), self.n

    # --- structure --------------------------------------------------------------------------

    @property
    def n(self) -> int:
        return int(self.parents.size)

    def __len__(self) -> int:
        return self.n

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, TokenTree):
            return NotImplemented
        return all(np.array_equal(getattr(self, f), getattr(other, f))
                   for f in ("tokens", "parents", "proposers", "probs"))

    __hash__ = None  # type: ignore[assignment]  # equal trees hold mutable-looking arrays

    @cached_property
    def _children(self) -> tuple[tuple[int, ...], ...]:
        kids: list[list[int]] = [[] for _ in range(self.n)]
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            kids[p].append(i)
        return tuple(tuple(k) for k in kids)

    def children(self, u: int) -> list[int]:
        """Children of node u in index order (for merged/fused trees: insertion order)."""
        return list(self._children[u])

    def children_lists(self) -> tuple[tuple[int, ...], ...]:
        """All children at once (cached), for loops over many nodes."""
        return self._children

    def depths(self) -> np.ndarray:
        return depths(self.parents)

    def attention_mask(self) -> np.ndarray:
        return ancestor_mask(self.parents)

    def position_ids(self, prefix_len: int) -> np.ndarray:
        return position_ids(self.parents, prefix_len)

    def path(self, node: int) -> list[int]:
        return path_to(self.parents, node)

    def path_tokens(self, node: int) -> np.ndarray:
        """Tokens after the root along the path to ``node`` (empty for the root)."""
        return self.tokens[self.path(node)[1:]].copy()

    def path_probs(self, values: Sequence[float] | np.ndarray | None = None) -> np.ndarray:
        """float64 [N]: product of ``values`` (default: the proposers' probs) along each
        node's path, root's own value excluded."""
        v = self.probs if values is None else np.asarray(values, np.float64).reshape(-1)
        if v.size != self.n:
            raise TreeError(f"path_probs: need one value per node ({self.n}), got {v.size}")
        pp = np.ones(self.n)
        for i, p in enumerate(self.parents.tolist()[1:], start=1):
            pp[i] = pp[p] * float(v[i])
        return pp

    def prune(self, conf: Sequence[float] | np.ndarray, min_gain: float) -> tuple[TokenTree, np.ndarray]:
        """Drop the nodes not worth verifying: (pruned tree, kept old node indices).

        ``conf[i]`` is P(the target agrees with node i | its parent was accepted). Siblings
        carry distinct tokens, so at most one of them is accepted, and the probability that
        node i ends on the accepted path (its expected gain in tokens) is the product of
        conf along its path. Nodes whose gain is below ``min_gain`` go. With conf in [0, 1]
        gains never grow along a path, so the kept set is ancestor-closed (a valid tree).
        """
        c = np.clip(np.asarray(conf, np.float64).reshape(-1), 0.0, 1.0)
        keep = np.flatnonzero(self.path_probs(c) >= float(min_gain))
        keep = np.union1d([0], keep)
        return (self if keep.size == self.n else self.subtree(keep)), keep

    def dfs_order(self) -> np.ndarray:
        """Pre-order DFS from the root, children in index order (a topological order)."""
        out, stack = [], [0]
        while stack:
            u = stack.pop()
            out.append(u)
            stack.extend(reversed(self._children[u]))
        return np.asarray(out, dtype=np.int64)

    def reorder(self, order: Sequence[int] | np.ndarray) -> TokenTree:
        """New tree whose node i is old node ``order[i]``; the order must be a topological
        permutation (root first, parents before children) or TreeError is raised."""
        order = np.asarray(order, dtype=np.int64).reshape(-1)
        if order.size != self.n or not np.array_equal(np.sort(order), np.arange(self.n)):
            raise TreeError(f"reorder: order must be a permutation of 0..{self.n - 1}")
        inv = np.empty(self.n, dtype=np.int64)
        inv[order] = np.arange(self.n)
        old_par = self.parents[order]
        new_par = np.where(old_par < 0, -1, inv[np.maximum(old_par, 0)])
        return TokenTree(self.tokens[order], new_par, self.proposers[order], self.probs[order])

    def subtree(self, keep: Sequence[int] | np.ndarray) -> TokenTree:
        """The tree induced by an ancestor-closed node set containing the root, original
        relative order kept (so it stays topological)."""
        idx = np.unique(np.asarray(keep, dtype=np.int64))
        if idx.size == 0 or idx[0] != 0:
            raise TreeError("subtree: the kept nodes must include the root")
        new = np.full(self.n, -1, dtype=np.int64)
        new[idx] = np.arange(idx.size)
        par = self.parents[idx]
        if (new[par[1:]] < 0).any():
            raise TreeError("subtree: a kept node's parent is not kept")
        return TokenTree(self.tokens[idx], np.concatenate([[-1], new[par[1:]]]),
                         self.proposers[idx], self.probs[idx])

    def truncate(self, max_nodes: int) -> TokenTree:
        """Keep at most ``max_nodes`` nodes (root included) with the highest path probability.

        Best-first growth from the root (a node becomes eligible once its parent is kept),
        so the result is always a valid tree. When probs <= 1, path probabilities never
        increase along a path, and this equals the global top-``max_nodes`` by path
        probability. Ties go to the shallower, then lower-index node (deterministic).
        """
        if max_nodes < 1:
            raise TreeError(f"truncate: max_nodes must be >= 1, got {max_nodes}")
        if self.n <= max_nodes:
            return self
        pp, d = self.path_probs(), self.depths()
        keep, frontier = [0], [(-pp[c], int(d[c]), c) for c in self._children[0]]
        heapq.heapify(frontier)
        while frontier and len(keep) < max_nodes:
            _, _, u = heapq.heappop(frontier)
            keep.append(u)
            for c in self._children[u]:
                heapq.heappush(frontier, (-pp[c], int(d[c]), c))
        return self.subtree(keep)


def merge_trees(trees: Sequence[TokenTree]) -> TokenTree:
    """Prefix-trie union of trees with the same root token (SpecInfer merge-based trees).

    Every root-to-node token path of every input is a path of the result, and the result
    has one node per distinct path (equal siblings merge, with ``TokenTree.add``'s rule for
    proposer/prob). Nodes appear in first-seen order: input by input, node by node.
    """
    if not trees:
        raise TreeError("merge_trees: need at least one tree")
    root_tok = int(trees[0].tokens[0])
    if any(int(t.tokens[0]) != root_tok for t in trees):
        raise TreeError(f"merge_trees: all roots must be token {root_tok}, got "
                        f"{[int(t.tokens[0]) for t in trees]}")
    out = TokenTree.root(root_tok)
    for t in trees:
        where = np.zeros(t.n, dtype=np.int64)  # node of t -> node of out
        for i in range(1, t.n):
            out, where[i] = out.add(int(where[t.parents[i]]), int(t.tokens[i]),
                                    int(t.proposers[i]), float(t.probs[i]))
    return out
