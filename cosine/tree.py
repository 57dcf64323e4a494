"""Token-tree topology as pure numpy functions.

A tree is given by ``parents`` (int array, node 0 is the root with parent -1 and every
other node's parent has a smaller index). These functions are shared by the verifier
worker (mask and positions for one forward) and the control plane (TokenTree).
"""

from __future__ import annotations

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
