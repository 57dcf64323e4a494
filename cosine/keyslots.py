"""Key slots: the column of a forward's key sequence where each new token's key and value
sit, chosen so that a token tree's forward computes, bit for bit, what decoding one token
at a time computes. Pure numpy, shared by the verifier worker (it lays out each forward)
and the control plane (it drops the tree nodes that cannot be laid out exactly).

Why the column matters: ONNX Runtime's CPU attention reduces over the key sequence in a
fixed pattern. The softmax's sum of exponentials keeps ``lanes`` partial sums, key i in
lane i % lanes (8 with AVX2, 16 with AVX-512), and the product with V sums the keys in
blocks of 128 (per output element, in column order). Masked keys add exact zeros. So a
token's attention is bit-identical to decoding's whenever its unmasked keys sit in the
same lanes and blocks, in the same order, as in decoding, where the token at position q
has its key at column q. With int8 activations (quantized targets) any last-bit
difference grows into different logits, so this is what makes quantized targets
lossless (docs/export.md, "Exactness").

A chain's tokens get exactly that: column = position. Tree siblings cannot share a
column; a node takes the first free column in its own lane and after its parent's,
``q + lanes * j``, and is exact while that stays in q's block. A node that finds none
(its block ends) is placed in any free column and marked inexact, with its descendants.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from cosine.tree import depths, validate_parents


@dataclass(frozen=True)
class KeyLayout:
    """The reduction pattern a tree forward must match: key i in lane ``i % lanes``,
    summed in blocks of ``block`` keys."""

    lanes: int = 8
    block: int = 128

    def __post_init__(self) -> None:
        if self.lanes < 1 or self.block < 1 or self.block % self.lanes:
            raise ValueError(f"KeyLayout needs lanes >= 1 dividing block, got lanes={self.lanes}, "
                             f"block={self.block}")

    def to_dict(self) -> dict[str, int]:
        return {"lanes": self.lanes, "block": self.block}

    @classmethod
    def from_dict(cls, d: Any) -> "KeyLayout | None":
        """The layout a worker advertises, or None (an engine without key slots)."""
        if not isinstance(d, dict):
            return None
        return cls(int(d["lanes"]), int(d["block"]))

    def keys_needed(self, last_position: int) -> int:
        """Key columns a forward needs so that every exact slot of a token at positions up
        to ``last_position`` exists: the end of that position's block."""
        return -(-(int(last_position) + 1) // self.block) * self.block


def host_layout() -> KeyLayout:
    """This host's layout for ONNX Runtime's CPU kernels: 16 lanes where the CPU has
    AVX-512 (its AVX-512 kernels sum 16 floats at a time), else 8 (AVX2; an SSE or NEON
    kernel's 4 lanes divide 8)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            avx512 = any(line.startswith("flags") and " avx512f" in line for line in f)
    except OSError:
        avx512 = True  # unknown: 16 lanes are exact for 8 and 4 as well
    return KeyLayout(lanes=16 if avx512 else 8)


@dataclass(frozen=True)
class Placement:
    slots: np.ndarray   # int64 [n]: key column of each node
    exact: np.ndarray   # bool [n]: the node (and so its whole path) is laid out as decoding's


def place(parents: np.ndarray, base: int, layout: KeyLayout, limit: int | None = None) -> Placement:
    """Key columns for a tree whose root sits at position ``base`` (node i at ``base +
    depth``), in a key sequence whose columns ``[base, limit)`` are free. ``limit`` None:
    as many as the exact slots need (``layout.keys_needed``).

    Greedy in node order (parents come first): each node takes the first free column of
    its lane after its parent's. Dropping nodes never moves a kept node to a later column,
    so a tree pruned to its exact nodes stays exact.
    """
    p = validate_parents(parents)
    q = depths(p) + int(base)
    end = layout.keys_needed(int(q.max())) if limit is None else int(limit)
    used: set[int] = set()
    slots = np.full(p.size, -1, np.int64)
    exact = np.zeros(p.size, bool)
    for i in range(p.size):
        par = int(p[i])
        if par >= 0 and not exact[par]:
            continue
        lo = q[i] if par < 0 else max(q[i], slots[par] + 1)
        c = int(q[i] + -(-(lo - q[i]) // layout.lanes) * layout.lanes)
        while c in used:
            c += layout.lanes
        if c // layout.block == q[i] // layout.block and c < end:
            slots[i], exact[i] = c, True
            used.add(c)
    free = (c for c in range(int(base), end if limit is not None else end + p.size) if c not in used)
    for i in np.flatnonzero(~exact):
        c = next(free, None)
        if c is None:
            raise ValueError(f"no free key column in [{base}, {end}) for a {p.size}-node tree")
        slots[i] = c
    return Placement(slots, exact)


def chain_slots(base: int, n: int) -> np.ndarray:
    """A chain's columns: its positions (exact by construction)."""
    return np.arange(int(base), int(base) + int(n), dtype=np.int64)


def appended(mask_shape: tuple[int, ...]) -> np.ndarray:
    """The key slots of a forward laid out as before key slots existed: new token t at
    P + t, for an attention mask of shape [B, 1, T, P + T] (int64 [B, T])."""
    B, T, W = int(mask_shape[0]), int(mask_shape[2]), int(mask_shape[3])
    return np.broadcast_to(np.arange(W - T, W, dtype=np.int64), (B, T)).copy()


def with_slots(session: Any, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``feeds`` plus appended key slots when ``session`` takes them and they are missing
    (callers that run a whole sequence, such as the parity check)."""
    if "key_slots" not in feeds and any(i.name == "key_slots" for i in session.get_inputs()):
        return {**feeds, "key_slots": appended(feeds["attention_mask"].shape)}
    return feeds
