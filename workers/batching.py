"""Run many requests' new tokens through one engine forward.

Each request brings its own past length p_b and t_b new tokens (a chain or a tree). The
batch is padded to P past columns and T = max t_b; the attention mask carries all of it:
past columns >= p_b are False, padded query rows attend only to themselves (a row with
no True column would be a softmax over nothing -> NaN). A batch of one passes its
request's whole cache slab (P = its capacity, no copy); a larger batch copies each
request's rows into one [B, Hkv, max p_b, D] buffer.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import numpy as np

from .engine import Engine
from .kvcache import Entry


@dataclass
class Feed:
    """New tokens for one request, attending to ``entry``'s cached rows."""

    entry: Entry
    tokens: np.ndarray  # int [t]
    positions: np.ndarray  # int64 [t]
    mask: np.ndarray | None = None  # bool [t, t] among the new tokens; None = causal
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


def _forward(engine: Engine, feeds: list[Feed]) -> list[FeedResult]:
    B = len(feeds)
    # A target's single-row forward is padded to ``min_rows`` rows (and logits rows): ONNX
    # Runtime computes a one-row product with other kernels than a many-row one, and with
    # int8 activations (MatMulNBits) the last-bit difference grows into different logits
    # (0.24 apart over 14 tokens of the 1.5B): a decode step must compute exactly what a
    # verify computes for the same token, or speculation would not be lossless.
    rows_at_least = engine.min_rows if B == 1 else 1
    T = max(max(f.tokens.size for f in feeds), rows_at_least)
    P = feeds[0].entry.capacity if B == 1 else max(f.entry.length for f in feeds)
    ids = np.zeros((B, T), np.int64)
    pos = np.zeros((B, T), np.int64)
    mask = np.zeros((B, 1, T, P + T), np.bool_)
    K = max(max(f.n_logits for f in feeds), rows_at_least)
    rows = np.zeros((B, K), np.int64)  # padded with each feed's last row (computed, then dropped)
    for b, f in enumerate(feeds):
        t, p = f.tokens.size, f.entry.length
        ids[b, :t] = f.tokens
        pos[b, :t] = f.positions
        mask[b, 0, :t, :p] = True
        mask[b, 0, :t, P:P + t] = _causal(t) if f.mask is None else f.mask
        pad = np.arange(t, T)
        mask[b, 0, pad, P + pad] = True
        rows[b] = t - 1
        rows[b, :f.n_logits] = np.arange(t - f.n_logits, t)

    if B == 1:  # the whole zero-filled slab [Hkv, cap, D]: a view, no copy; the mask hides cap - length
        e = feeds[0].entry
        past = [(e.k[layer][None], e.v[layer][None]) for layer in range(engine.num_layers)]
    else:
        past = []
        shape = (B, engine.num_kv_heads, P, engine.head_dim)
        for layer in range(engine.num_layers):
            k = engine.arrays.zeros(shape, engine.dtype)  # on the cache's device: no host copy
            v = engine.arrays.zeros(shape, engine.dtype)
            for b, f in enumerate(feeds):
                pk, pv = f.entry.past(layer)
                k[b, :, :pk.shape[1]] = pk
                v[b, :, :pv.shape[1]] = pv
            past.append((k, v))

    logits, new_k, new_v = engine.forward(ids, pos, mask, past, rows)
    res = []
    for b, f in enumerate(feeds):
        t = f.tokens.size
        res.append(FeedResult(logits[b, :f.n_logits], [k[b, :, :t] for k in new_k], [v[b, :, :t] for v in new_v]))
    return res
