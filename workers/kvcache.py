"""Per-request KV cache slabs with a token budget.

Each request owns, per layer, one K and one V slab of shape [Hkv, cap, D] (heads-major,
as in docs/design.md), zero-filled: its first n cached tokens are ``slab[:, :n]``. A batch
of one passes the whole slab to the engine without copying and masks the columns past n
(zeros there keep the masked scores finite). Slabs grow in chunks.

The budget counts logical tokens: committed rows plus the rows of a pending (verified,
not yet committed) tree. Every operation that adds tokens checks the budget first and
raises ProtocolError("capacity") with nothing changed.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosine.protocol import ProtocolError

from .arrays import Arrays, NumpyArrays

log = logging.getLogger("cosine.worker.kvcache")


@dataclass
class PendingTree:
    """A verified tree's K/V rows, kept until commit (or discarded)."""

    parents: np.ndarray  # int64 [N]
    k: list[Any]  # per layer [Hkv, N, D], where the cache lives (arrays.py)
    v: list[Any]

    @property
    def size(self) -> int:
        return int(self.parents.size)


@dataclass
class Entry:
    """One request's cache."""

    rid: str
    k: list[Any]  # per layer [Hkv, capacity, D] slabs, numpy or device tensors (arrays.py)
    v: list[Any]
    length: int = 0
    pending: PendingTree | None = None
    last_used: float = field(default_factory=time.monotonic)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)

    @property
    def capacity(self) -> int:
        return int(self.k[0].shape[1])

    @property
    def tokens(self) -> int:
        """Tokens charged to the budget."""
        return self.length + (self.pending.size if self.pending else 0)

    def past(self, layer: int) -> tuple[Any, Any]:
        """Views of the cached rows of one layer, [Hkv, length, D]."""
        return self.k[layer][:, :self.length], self.v[layer][:, :self.length]


class KVCache:
    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, dtype: np.dtype,
                 budget_tokens: int, chunk_tokens: int = 128, max_tokens: int | None = None,
                 arrays: Arrays | None = None):
        self.num_layers = num_layers
        self.kv_heads, self.head_dim = num_kv_heads, head_dim
        self.arrays = arrays or NumpyArrays()
        self.dtype = np.dtype(dtype)
        self.budget = int(budget_tokens)
        self.chunk = int(chunk_tokens)
        self.max_tokens = max_tokens  # per request (the engine's context): caps slab growth
        self.entries: dict[str, Entry] = {}
        self.freed_idle = 0

    # ----- accounting -------------------------------------------------------------
    @property
    def used(self) -> int:
        return sum(e.tokens for e in self.entries.values())

    def check_budget(self, delta: int, what: str = "") -> None:
        """Raise ``capacity`` if adding ``delta`` tokens would exceed the budget."""
        used = self.used
        if delta > 0 and used + delta > self.budget:
            raise ProtocolError("capacity", f"KV budget full: {used} of {self.budget} tokens used, "
                                            f"{what or 'request'} needs {delta} more; retry later or elsewhere")

    # ----- lookup / lifetime ---------------------------------------------------------
    def __contains__(self, rid: str) -> bool:
        return rid in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, rid: str) -> Entry:
        e = self.entries.get(rid)
        if e is None:
            raise ProtocolError("unknown_request", f"request {rid!r} is not held by this worker "
                                                   f"(never prefilled, released or freed after idling)")
        return e

    def create(self, rid: str, reserve: int = 0) -> Entry:
        """New empty entry with room for ``reserve`` tokens (budget is charged on append)."""
        if rid in self.entries:
            raise ProtocolError("duplicate_request", f"request {rid!r} is already held")
        cap = self._round(max(reserve, 1))
        e = Entry(rid, [self._slab(cap) for _ in range(self.num_layers)], [self._slab(cap) for _ in range(self.num_layers)])
        self.entries[rid] = e
        return e

    def release(self, rid: str) -> bool:
        return self.entries.pop(rid, None) is not None

    def evict_idle(self, idle_timeout_s: float, now: float | None = None) -> list[str]:
        """Free requests untouched for ``idle_timeout_s``: a client that died must not pin memory."""
        now = time.monotonic() if now is None else now
        gone = [e for e in self.entries.values() if now - e.last_used > idle_timeout_s]
        for e in gone:
            del self.entries[e.rid]
            self.freed_idle += 1
            log.warning("freed idle request %r after %.1f s (%d tokens; idle_timeout_s=%g)",
                        e.rid, now - e.last_used, e.tokens, idle_timeout_s)
        return [e.rid for e in gone]

    # ----- mutation ----------------------------------------------------------------
    def _round(self, n: int) -> int:
        cap = -(-n // self.chunk) * self.chunk
        return min(cap, self.max_tokens) if self.max_tokens else cap

    def _slab(self, cap: int) -> Any:
        return self.arrays.zeros((self.kv_heads, cap, self.head_dim), self.dtype)

    def _ensure(self, e: Entry, need: int) -> None:
        if need <= e.capacity:
            return
        cap = self._round(max(need, e.capacity + e.capacity // 2))  # amortized growth
        cap = max(cap, need)
        for layer in range(self.num_layers):
            for slabs in (e.k, e.v):
                new = self._slab(cap)
                new[:, :e.length] = slabs[layer][:, :e.length]
                slabs[layer] = new

    def append(self, e: Entry, k: list[Any], v: list[Any]) -> None:
        """Append rows (per layer [Hkv, n, D]) at the request's length."""
        n = int(k[0].shape[1])
        if n == 0:
            return
        self.check_budget(n - (e.pending.size if e.pending else 0), f"request {e.rid!r}")
        e.pending = None  # a pending tree was computed against the old length
        self._ensure(e, e.length + n)
        for layer in range(self.num_layers):
            e.k[layer][:, e.length:e.length + n] = k[layer]
            e.v[layer][:, e.length:e.length + n] = v[layer]
        e.length += n

    def truncate(self, e: Entry, length: int) -> None:
        """Roll back to ``length`` (<= current). Rows past it are just forgotten."""
        if not 0 <= length <= e.length:
            raise ProtocolError("bad_request", f"request {e.rid!r}: cannot roll back to {length}, "
                                               f"cache length is {e.length}")
        e.length = length
        e.pending = None

    def set_pending(self, e: Entry, parents: np.ndarray, k: list[Any], v: list[Any]) -> None:
        self.check_budget(int(parents.size) - (e.pending.size if e.pending else 0), f"request {e.rid!r} tree")
        e.pending = PendingTree(parents, k, v)

    def commit(self, e: Entry, nodes: list[int]) -> None:
        """Copy the accepted nodes' rows, in order, to consecutive slots after the cache."""
        p = e.pending
        check_commit_nodes(e.rid, p, nodes)
        assert p is not None
        idx = self.arrays.index(np.asarray(nodes, np.int64))
        e.pending = None  # frees the tree's budget before the (smaller) accepted part is charged
        n = len(nodes)
        self._ensure(e, e.length + n)
        for layer in range(self.num_layers):
            e.k[layer][:, e.length:e.length + n] = p.k[layer][:, idx]
            e.v[layer][:, e.length:e.length + n] = p.v[layer][:, idx]
        e.length += n


def check_commit_nodes(rid: str, pending: PendingTree | None, nodes: object) -> list[int]:
    """Validate a commit path against the pending tree without changing anything."""
    if pending is None:
        raise ProtocolError("bad_request", f"request {rid!r}: commit without a pending verified tree")
    if (not isinstance(nodes, list) or not nodes
            or not all(isinstance(i, int) and not isinstance(i, bool) for i in nodes)):
        raise ProtocolError("bad_request", f"request {rid!r}: commit nodes must be a non-empty list of ints")
    if nodes[0] != 0:
        raise ProtocolError("bad_request", f"request {rid!r}: commit nodes must start at the root 0, got {nodes[0]}")
    for a, b in zip(nodes, nodes[1:]):
        if not 0 < b < pending.size or pending.parents[b] != a:
            raise ProtocolError("bad_request", f"request {rid!r}: commit node {b} is not a child of node {a} "
                                               f"in the pending tree of {pending.size} nodes")
    return nodes
