"""Run many requests' new tokens through one engine forward.

Each request brings its own past length p_b and t_b new tokens (a chain or a tree). The
batch is padded to P past columns and T = max t_b; the attention mask carries all of it:
past columns >= p_b are False, padded query rows attend only to themselves (a row with
no True column would be a softmax over nothing -> NaN). A batch of one passes its
request's whole cache slab (P = its capacity, no copy) when it is wide enough; otherwise
each request's rows are copied into one [B, Hkv, P, D] buffer.

Where the engine takes ``key_slots``, each new token's key sits at the column
cosine/keyslots.py chooses (a chain's at its position, inside the free past columns or
after them), so that any batch, chain or tree computes bit for bit what decoding one
token at a time computes; P is then widened to the end of the last position's block.
Without it (the plain graph), new keys follow the past at P + t.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from cosine.keyslots import chain_slots, place
from cosine.tree import ancestor_mask

from .engine import Engine
from .kvcache import Entry


@dataclass
class Feed:
    """New tokens for one request, attending to ``entry``'s cached rows."""

    entry: Entry
    tokens: np.ndarray  # int [t]
    positions: np.ndarray  # int64 [t]
    parents: np.ndarray | None = None  # a tree's parents (cosine/tree.py); None = a chain
    last_logits: int | None = None  # logits only for the last n tokens (None = all t)

    @property
    def n_logits(self) -> int:
        t = self.tokens.size
        return t if self.last_logits is None else max(1, min(t, self.last_logits))


@dataclass
class FeedResult:
    logits: np.ndarray  # float32 [n_logits, V]: the feed's last n_logits rows
    k: list[Any]  # per layer [Hkv, t, D], where the cache lives
    v: list[Any]


def chain(entry: Entry, tokens: np.ndarray, last_logits: int | None = None) -> Feed:
    """Feed for tokens appended after the cache (positions continue the sequence)."""
    return Feed(entry, tokens, np.arange(entry.length, entry.length + tokens.size, dtype=np.int64),
                last_logits=last_logits)


def run_batched(engine: Engine, feeds: list[Feed], max_batch: int) -> list[FeedResult]:
    """Forward every feed (t >= 1) in groups of at most ``max_batch``; results in order.

    Does not touch the cache: callers append the returned rows, so a failing forward
    leaves no half-written state.
    """
    out: list[FeedResult] = []
    for i in range(0, len(feeds), max_batch):
        out.extend(_forward(engine, feeds[i:i + max_batch]))
    return out


@functools.lru_cache(maxsize=64)
def _causal(t: int) -> np.ndarray:
    return np.tril(np.ones((t, t), np.bool_))


@dataclass
class _Layout:
    """Where one feed's new tokens sit in the key sequence, and whom each attends."""

    slots: np.ndarray   # int64 [t]
    among: np.ndarray   # bool [t, t]: new token i attends new token j
    inexact: int        # tree nodes that could not get decoding's columns


def _layout(engine: Engine, f: Feed, P: int, T: int) -> _Layout:
    t, p = f.tokens.size, f.entry.length
    among = _causal(t) if f.parents is None else ancestor_mask(f.parents)
    if engine.layout is None:
        return _Layout(P + np.arange(t), among, 0)
    if f.parents is None:
        return _Layout(chain_slots(p, t), among, 0)
    placed = place(f.parents, p, engine.layout, limit=P + T)
    return _Layout(placed.slots, among, int((~placed.exact).sum()))


def _inputs(engine: Engine, feeds: list[Feed], P: int, T: int, K: int) -> tuple[np.ndarray, ...]:
    """(input_ids, position_ids, key_slots, attention_mask, logits_index) of a batch padded
    to P past columns, T new tokens and K logits rows."""
    B = len(feeds)
    ids = np.zeros((B, T), np.int64)
    pos = np.zeros((B, T), np.int64)
    slots = np.zeros((B, T), np.int64)
    mask = np.zeros((B, 1, T, P + T), np.bool_)
    rows = np.zeros((B, K), np.int64)  # padded with each feed's last row (computed, then dropped)
    for b, f in enumerate(feeds):
        t, p = f.tokens.size, f.entry.length
        lay = _layout(engine, f, P, T)
        engine.inexact_nodes += lay.inexact
        ids[b, :t] = f.tokens
        pos[b, :t] = f.positions
        slots[b, :t] = lay.slots
        mask[b, 0, :t, :p] = True
        mask[b, 0][np.ix_(np.arange(t), lay.slots)] = lay.among  # (not mask[b, 0, :t, slots]: numpy would transpose it)
        if engine.layout is None:  # the graph puts new token i at P + i
            slots[b, t:] = P + np.arange(t, T)
        else:  # padding rows: any other free column
            slots[b, t:] = np.setdiff1d(np.arange(p, P + T), lay.slots)[:T - t]
        mask[b, 0, np.arange(t, T), slots[b, t:]] = True
        rows[b] = t - 1
        rows[b, :f.n_logits] = np.arange(t - f.n_logits, t)
    return ids, pos, slots, mask, rows


def _past(engine: Engine, feeds: list[Feed], P: int, slab: bool) -> list[tuple[Any, Any]]:
    """A batch of one passes its whole zero-filled slab [Hkv, cap, D] (a view, no copy; the
    mask hides cap - length); otherwise each request's rows are copied into [B, Hkv, P, D]."""
    if slab:
        e = feeds[0].entry
        return [(e.k[layer][None], e.v[layer][None]) for layer in range(engine.num_layers)]
    past = []
    shape = (len(feeds), engine.num_kv_heads, P, engine.head_dim)
    for layer in range(engine.num_layers):
        k = engine.arrays.zeros(shape, engine.dtype)  # on the cache's device: no host copy
        v = engine.arrays.zeros(shape, engine.dtype)
        for b, f in enumerate(feeds):
            pk, pv = f.entry.past(layer)
            k[b, :, :pk.shape[1]] = pk
            v[b, :, :pv.shape[1]] = pv
        past.append((k, v))
    return past


def _forward(engine: Engine, feeds: list[Feed]) -> list[FeedResult]:
    B = len(feeds)
    # A target's single-row forward is padded to ``min_rows`` rows (and logits rows): ONNX
    # Runtime computes a one-row product with other kernels than a many-row one, and with
    # int8 activations (MatMulNBits) the last-bit difference grows into different logits
    # (0.24 apart over 14 tokens of the 1.5B): a decode step must compute exactly what a
    # verify computes for the same token, or speculation would not be lossless. Engines whose
    # products compute a row alike in any company (manifest "one_row_exact": the GGUF kernel)
    # have min_rows 1 and run one row.
    rows_at_least = engine.min_rows if B == 1 else 1
    T = max(max(f.tokens.size for f in feeds), rows_at_least)
    P = max(f.entry.length for f in feeds)
    if engine.layout is not None:  # room for every exact slot (keyslots.KeyLayout.keys_needed)
        P = max(P, engine.layout.keys_needed(max(int(f.positions.max()) for f in feeds)) - T)
    slab = B == 1 and P <= feeds[0].entry.capacity
    if slab:
        P = feeds[0].entry.capacity
    ids, pos, slots, mask, rows = _inputs(engine, feeds, P, T, max(max(f.n_logits for f in feeds), rows_at_least))
    past = _past(engine, feeds, P, slab)
    logits, new_k, new_v = engine.forward(ids, pos, mask, past, rows, slots)
    res = []
    for b, f in enumerate(feeds):
        t = f.tokens.size
        res.append(FeedResult(logits[b, :f.n_logits], [k[b, :, :t] for k in new_k], [v[b, :, :t] for v in new_v]))
    return res
