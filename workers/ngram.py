"""Domain n-gram drafter: a weight-free drafter built from a token-id corpus.

Tables (one per context length c = 1..order-1, plus dense unigram counts) are plain
numpy arrays saved as .npy files and memory-mapped on load, so a multi-million-token
model opens instantly and draft-time lookup is a binary search (np.searchsorted) on
sorted context keys - no Python dicts.

Per context length c:
    keys    uint64 [n_ctx]      sorted context keys (exact packing or a 64-bit hash, below)
    offsets int64  [n_ctx + 1]  candidate slice of each context
    ids     int32  [n_pairs]    next tokens, within a context by count desc, then id asc
    counts  int32  [n_pairs]
    totals  int64  [n_ctx]      sum of the context's (kept) counts
Contexts never span document boundaries.

Probability model: interpolated absolute discounting (Ney et al. 1994), recursive over
the matched context lengths c* >= c >= 1 down to the unigram:

    P_0(w)      = n(w) / N                                   (corpus unigram)
    P_c(w | h)  = max(n(h, w) - D_c, 0) / n(h)  +  D_c * u(h) / n(h) * P_{c-1}(w | h')

n(h) = kept count of context h, u(h) = number of distinct kept continuations, h' = h
without its oldest token, D_c = n1 / (n1 + 2 n2) from the order's count-of-counts
(clipped to [0.05, 0.95]). c* is the longest context present in the tables (lengths
below it are then present too, since a kept (h, w) implies a kept (h', w)). This is a
proper distribution whose support is every token seen in the corpus; tokens never seen
get probability 0 (a drafter q may be 0 where the target is not: verification handles
it). Temperature T > 0 gives q_T(w) = P(w)^(1/T) / sum_v P(v)^(1/T); T = 0 is greedy
(argmax, ties to the lower id) and reports the T = 1 probabilities (docs/protocol.md).

Every probability is computed in float64 by the same expression in the sparse
(top-k, draft) and dense (full_distribution) paths, then rounded to float32; ranking
uses the float32 values, so the greedy token is exactly np.argmax(full_distribution).

Not thread-safe: one scratch array is reused across calls (the worker has one compute
thread).
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Sequence

import numpy as np

META_FILE = "ngram.json"
FORMAT_VERSION = 1


# ----- context keys -------------------------------------------------------------------

def key_bits(vocab_size: int) -> int:
    return max(1, int(vocab_size - 1).bit_length())


def context_keys(windows: np.ndarray, vocab_size: int) -> np.ndarray:
    """uint64 key per row of ``windows`` [n, c]. Exact bit packing when c tokens fit in 64
    bits (c <= 3 for vocabularies up to 2^21, e.g. Qwen's 151,936), otherwise a
    splitmix64-mixed polynomial hash (collision chance ~ n_ctx^2 / 2^65)."""
    w = np.asarray(windows, dtype=np.uint64)
    n, c = w.shape
    bits = key_bits(vocab_size)
    if c * bits <= 64:
        key = np.zeros(n, np.uint64)
        for j in range(c):
            key = (key << np.uint64(bits)) | w[:, j]
        return key
    h = np.full(n, 0x9E3779B97F4A7C15, np.uint64)
    with np.errstate(over="ignore"):
        for j in range(c):
            h = (h ^ (w[:, j] + np.uint64(1))) * np.uint64(0xBF58476D1CE4E5B9)
        h ^= h >> np.uint64(31)
        h *= np.uint64(0x94D049BB133111EB)
        h ^= h >> np.uint64(29)
    return h


# ----- top-k selection shared with the lookup drafter ---------------------------------

def top_k(ids: np.ndarray, probs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The k most probable (prob desc, ties to the lower id) of candidates with prob > 0;
    ids padded with -1, probs with 0. ``probs`` are float32 (the ranking values)."""
    out_ids = np.full(k, -1, np.int32)
    out_p = np.zeros(k, np.float32)
    keep = probs > 0
    ids, probs = ids[keep], probs[keep]
    if k == 0 or ids.size == 0:
        return out_ids, out_p
    if ids.size > k:  # keep every candidate tied with the k-th value, then order exactly
        thr = np.partition(probs, ids.size - k)[ids.size - k]
        sel = np.nonzero(probs >= thr)[0]
        ids, probs = ids[sel], probs[sel]
    order = np.lexsort((ids, -probs))[:k]
    out_ids[:order.size] = ids[order]
    out_p[:order.size] = probs[order]
    return out_ids, out_p


def check_forced(forced: Sequence[int] | None, k: int) -> list[int]:
    if forced is None:
        return [-1] * k
    forced = [int(t) for t in forced]
    if len(forced) != k:
        raise ValueError(f"forced must have k={k} entries, got {len(forced)}")
    return forced


# ----- the model ----------------------------------------------------------------------

class _Table:
    """Arrays of one context length (possibly memory-mapped)."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, ids: np.ndarray, counts: np.ndarray,
                 totals: np.ndarray):
        self.keys, self.offsets, self.ids, self.counts, self.totals = keys, offsets, ids, counts, totals

    def find(self, key: np.uint64) -> int:
        i = int(np.searchsorted(self.keys, key))
        return i if i < self.keys.size and self.keys[i] == key else -1


class NgramModel:
    def __init__(self, order: int, vocab_size: int, unigram: np.ndarray, tables: list[_Table],
                 discounts: list[float], min_count: int = 1, tokens: int | None = None):
        if order < 1 or len(tables) != order - 1 or len(discounts) != order - 1:
            raise ValueError(f"order {order} needs {order - 1} tables and discounts")
        self.order = order
        self.vocab_size = int(vocab_size)
        self.min_count = int(min_count)
        self.discounts = [float(d) for d in discounts]
        self.tables = tables
        self.unigram = unigram  # int64 [V] corpus counts
        self.tokens = int(unigram.sum()) if tokens is None else int(tokens)
        if self.tokens <= 0:
            raise ValueError("empty corpus")
        # Derived (in memory): unigram probabilities, support sorted by (count desc, id asc),
        # and a scratch id -> candidate-slot map kept at -1 between calls.
        self.a0 = np.asarray(unigram, dtype=np.float64) / self.tokens
        support = np.nonzero(unigram)[0]
        self.support = support[np.lexsort((support, -np.asarray(unigram)[support]))].astype(np.int32)
        self._pos = np.full(self.vocab_size, -1, np.int64)
        self._pow_cache: dict[float, tuple[np.ndarray, float]] = {}

    # ----- building and storage -----------------------------------------------------------
    @classmethod
    def build(cls, docs: np.ndarray | Sequence[np.ndarray], vocab_size: int, order: int = 4,
              min_count: int = 1) -> "NgramModel":
        """Count a corpus: one int array, or a list of documents (contexts never span two)."""
        if isinstance(docs, np.ndarray):
            docs = [docs]
        docs = [np.asarray(d, dtype=np.int64).ravel() for d in docs if len(d)]
        corpus = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        if corpus.size == 0:
            raise ValueError("empty corpus")
        if corpus.min() < 0 or corpus.max() >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        starts = np.cumsum([0] + [d.size for d in docs[:-1]])
        # offset of every position inside its document
        in_doc = np.arange(corpus.size) - np.repeat(starts, [d.size for d in docs])
        unigram = np.bincount(corpus, minlength=vocab_size).astype(np.int64)
        tables, discounts = [], []
        for c in range(1, order):
            pos = np.nonzero(in_doc >= c)[0]
            windows = np.stack([corpus[pos - c + j] for j in range(c)], axis=1) if pos.size else \
                np.zeros((0, c), np.int64)
            t, d = _count_table(context_keys(windows, vocab_size), corpus[pos], min_count)
            tables.append(t)
            discounts.append(d)
        return cls(order, vocab_size, unigram, tables, discounts, min_count)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "unigram.npy", np.asarray(self.unigram, np.int64))
        for c, t in enumerate(self.tables, start=1):
            for name in ("keys", "offsets", "ids", "counts", "totals"):
                np.save(out / f"c{c}_{name}.npy", np.asarray(getattr(t, name)))
        meta = {"format_version": FORMAT_VERSION, "order": self.order, "vocab_size": self.vocab_size,
                "min_count": self.min_count, "tokens": self.tokens, "discounts": self.discounts,
                "contexts": [int(t.keys.size) for t in self.tables],
                "pairs": [int(t.ids.size) for t in self.tables],
                "key": {"bits": key_bits(self.vocab_size), "exact_up_to_context": 64 // key_bits(self.vocab_size)}}
        (out / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")

    @classmethod
    def load(cls, in_dir: str | Path, mmap: bool = True) -> "NgramModel":
        d = Path(in_dir)
        meta_path = d / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{meta_path} not found: not an n-gram drafter directory")
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{meta_path}: format_version {meta.get('format_version')}, expected {FORMAT_VERSION}")
        mode = "r" if mmap else None
        tables = [_Table(*(np.load(d / f"c{c}_{n}.npy", mmap_mode=mode)
                           for n in ("keys", "offsets", "ids", "counts", "totals")))
                  for c in range(1, meta["order"])]
        return cls(meta["order"], meta["vocab_size"], np.load(d / "unigram.npy"), tables, meta["discounts"],
                   meta.get("min_count", 1), meta["tokens"])

    # ----- probabilities --------------------------------------------------------------------
    def _chain(self, context: np.ndarray) -> tuple[float, list[tuple[np.ndarray, np.ndarray]]]:
        """beta_0 and, for context lengths 1..c*, (ids, beta_c * a_c(ids)) where
        P(w) = beta_0 a_0(w) + sum_c beta_c a_c(w), summed in that order."""
        ctx = np.asarray(context, dtype=np.int64).ravel()
        slices = []
        for c in range(1, min(self.order - 1, ctx.size) + 1):
            t = self.tables[c - 1]
            i = t.find(context_keys(ctx[-c:][None, :], self.vocab_size)[0])
            if i < 0:
                break
            lo, hi = int(t.offsets[i]), int(t.offsets[i + 1])
            slices.append((np.asarray(t.ids[lo:hi]), np.asarray(t.counts[lo:hi]), int(t.totals[i]),
                           self.discounts[c - 1]))
        beta, terms = 1.0, []
        for ids, counts, total, D in reversed(slices):
            terms.append((ids, beta * ((counts - D) / total)))
            beta *= D * ids.size / total
        terms.reverse()
        return beta, terms

    def _dense(self, context: np.ndarray) -> np.ndarray:
        beta0, terms = self._chain(context)
        p = beta0 * self.a0
        for ids, v in terms:
            p[ids] += v
        return p

    def full_distribution(self, context: np.ndarray, vocab_size: int | None = None,
                          temperature: float = 1.0) -> np.ndarray:
        """q over the vocabulary (float32 [vocab_size], sums to 1) at ``temperature``
        (0 = the T = 1 distribution, as the draft op reports it)."""
        V = self.vocab_size if vocab_size is None else int(vocab_size)
        if V < self.vocab_size:
            raise ValueError(f"vocab_size {V} is smaller than the model's {self.vocab_size}")
        p = self._dense(context)
        if temperature > 0 and temperature != 1.0:
            p = np.where(p > 0, p, 0.0) ** (1.0 / temperature)
            p /= p.sum()
        out = np.zeros(V, np.float32)
        out[:self.vocab_size] = p
        return out

    def next_distribution(self, context: np.ndarray, topk: int,
                          temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ids (int32, -1 padded) and probabilities (float32) after ``context``."""
        _, _, ids, probs = self._step(context, topk, temperature, None, -1)
        return ids, probs

    # ----- one drafting step --------------------------------------------------------------
    def _pow_unigram(self, inv_t: float) -> tuple[np.ndarray, float]:
        """cumsum of a_0^(1/T) over the support order, and its total (cached per T)."""
        hit = self._pow_cache.get(inv_t)
        if hit is None:
            cum = np.cumsum(self.a0[self.support] ** inv_t)
            hit = (cum, float(cum[-1]))
            self._pow_cache = {inv_t: hit}
        return hit

    def _step(self, context: np.ndarray, topk: int, temperature: float, rng: np.random.Generator | None,
              forced: int) -> tuple[int, float, np.ndarray, np.ndarray]:
        """(chosen token, its probability, top-k ids, top-k probs), probabilities at T
        (T = 1 when greedy). Candidates: U = tokens of the matched lists (exact P), and the
        rest of the support R, where P(w) = beta_0 a_0(w) and the order is the unigram's."""
        beta0, terms = self._chain(context)
        pos = self._pos
        if terms:
            U = terms[0][0].astype(np.int64)
            pos[U] = np.arange(U.size)
            for ids, _ in terms[1:]:  # a hash collision could break list nesting: extend U
                new = ids[pos[ids] < 0]
                if new.size:
                    pos[new] = np.arange(U.size, U.size + new.size)
                    U = np.concatenate([U, new])
        else:
            U = np.zeros(0, np.int64)
        try:
            vals = beta0 * self.a0[U]
            for ids, v in terms:
                vals[pos[ids]] += v
            want = max(topk, 1)
            rest = self._rest(want)  # best `want` support tokens outside U
            rest_vals = beta0 * self.a0[rest]
            inv_t = 1.0 / temperature if temperature > 0 else 1.0
            if inv_t == 1.0:
                z = 1.0
            else:
                _, a_t = self._pow_unigram(inv_t)
                r_mass = max(a_t - float(np.sum(self.a0[U] ** inv_t)), 0.0)
                z = float(np.sum(vals ** inv_t)) + beta0 ** inv_t * r_mass
            cand = np.concatenate([U, rest])
            cand_p = (np.concatenate([vals, rest_vals]) ** inv_t / z).astype(np.float32)
            top_ids, top_p = top_k(cand, cand_p, want)
            if forced >= 0:
                tok = forced
            elif temperature > 0:
                tok = self._sample(U, vals, beta0, inv_t, z, rng if rng is not None else np.random.default_rng())
            else:
                tok = int(top_ids[0])
            if 0 <= tok < self.vocab_size:
                pt = vals[pos[tok]] if pos[tok] >= 0 else beta0 * self.a0[tok]
                tok_p = float(np.float32(pt ** inv_t / z)) if pt > 0 else 0.0
            else:
                tok_p = 0.0
        finally:
            pos[U] = -1
        return tok, tok_p, top_ids[:topk], top_p[:topk]

    def _rest(self, n: int) -> np.ndarray:
        """The first n support tokens (unigram order) whose slot in self._pos is free."""
        got: list[np.ndarray] = []
        have, start, chunk = 0, 0, max(4 * n, 256)
        while have < n and start < self.support.size:
            block = self.support[start:start + chunk]
            free = block[self._pos[block] < 0]
            got.append(free)
            have += free.size
            start += chunk
            chunk *= 2
        return np.concatenate(got)[:n].astype(np.int64) if got else np.zeros(0, np.int64)

    def _sample(self, U: np.ndarray, vals: np.ndarray, beta0: float, inv_t: float, z: float,
                rng: np.random.Generator) -> int:
        """Exact draw from P^(1/T)/z: U by its weights, else R by the unigram's weights
        (rejection sampling from the full unigram^(1/T), explicit after 64 misses)."""
        w_u = vals ** inv_t
        m_u = float(w_u.sum())
        r = rng.random() * z
        if r < m_u or beta0 <= 0:
            return int(U[min(np.searchsorted(np.cumsum(w_u), r, side="right"), U.size - 1)])
        cum, a_t = self._pow_unigram(inv_t)
        for _ in range(64):
            j = min(int(np.searchsorted(cum, rng.random() * a_t, side="right")), self.support.size - 1)
            w = int(self.support[j])
            if self._pos[w] < 0:
                return w
        rest = self.support[self._pos[self.support] < 0]
        wr = np.cumsum(self.a0[rest] ** inv_t)
        return int(rest[min(np.searchsorted(wr, rng.random() * wr[-1], side="right"), rest.size - 1)])

    def draft(self, context: np.ndarray, k: int, topk: int, temperature: float = 0.0,
              rng: np.random.Generator | None = None, forced: Sequence[int] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """k steps after ``context`` (the request's tokens, ending with the root): tokens
        int32 [k], token_probs float32 [k], topk_ids int32 [k, topk], topk_probs float32
        [k, topk]. Greedy at temperature 0, else sampled from q_T; ``forced[i] >= 0``
        overrides step i's choice (its probability is still reported)."""
        forced_l = check_forced(forced, k)
        if temperature > 0 and rng is None:
            rng = np.random.default_rng()
        hist = list(np.asarray(context, dtype=np.int64).ravel()[-(self.order - 1):]) if self.order > 1 else []
        tokens = np.zeros(k, np.int32)
        token_probs = np.zeros(k, np.float32)
        topk_ids = np.full((k, topk), -1, np.int32)
        topk_probs = np.zeros((k, topk), np.float32)
        for i in range(k):
            tok, p, ids, probs = self._step(np.asarray(hist, np.int64), topk, temperature, rng, forced_l[i])
            tokens[i], token_probs[i], topk_ids[i], topk_probs[i] = tok, p, ids, probs
            if self.order > 1:
                hist = (hist + [tok])[-(self.order - 1):]
        return tokens, token_probs, topk_ids, topk_probs


def _count_table(keys: np.ndarray, nxt: np.ndarray, min_count: int) -> tuple[_Table, float]:
    """Group (context key, next token) pairs into a _Table and estimate the discount."""
    if keys.size == 0:
        empty = np.zeros(0, np.int64)
        return _Table(np.zeros(0, np.uint64), np.zeros(1, np.int64), np.zeros(0, np.int32),
                      np.zeros(0, np.int32), empty), 0.5
    order = np.lexsort((nxt, keys))
    k, t = keys[order], nxt[order]
    new = np.ones(k.size, bool)
    new[1:] = (k[1:] != k[:-1]) | (t[1:] != t[:-1])
    starts = np.nonzero(new)[0]
    pk, pt = k[starts], t[starts]
    pc = np.diff(np.append(starts, k.size))
    n1, n2 = int(np.sum(pc == 1)), int(np.sum(pc == 2))
    D = float(np.clip(n1 / (n1 + 2 * n2), 0.05, 0.95)) if n1 + n2 else 0.5
    keep = pc >= min_count
    pk, pt, pc = pk[keep], pt[keep], pc[keep]
    o = np.lexsort((pt, -pc, pk))  # per context: count desc, id asc
    pk, pt, pc = pk[o], pt[o], pc[o]
    first = np.ones(pk.size, bool)
    first[1:] = pk[1:] != pk[:-1]
    cstarts = np.nonzero(first)[0]
    offsets = np.append(cstarts, pk.size).astype(np.int64)
    totals = np.add.reduceat(pc, cstarts).astype(np.int64) if pk.size else np.zeros(0, np.int64)
    return _Table(pk[cstarts].astype(np.uint64), offsets, pt.astype(np.int32), pc.astype(np.int32), totals), D


def bench_draft(model, contexts: Sequence[np.ndarray], k: int = 8, topk: int = 8, temperature: float = 0.0,
                seed: int = 0) -> float:
    """Mean microseconds per drafted token over ``contexts`` (k tokens each, one core)."""
    rng = np.random.default_rng(seed)
    model.draft(contexts[0], k, topk, temperature, rng)  # warm caches and page in the mmap
    t0 = time.perf_counter()
    for c in contexts:
        model.draft(c, k, topk, temperature, rng)
    return (time.perf_counter() - t0) / (len(contexts) * k) * 1e6
