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

Cost per drafted token: Fagin's threshold algorithm over the count-sorted candidate
lists (greedy and T = 1 never touch a whole list); T not in {0, 1} needs the normalizer
sum_v P(v)^(1/T), which costs one pass over the lowest matched list.
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

def context_key(ctx: Sequence[int], vocab_size: int) -> int:
    """context_keys for one context, in Python ints (a single row is far cheaper this way)."""
    bits, mask = key_bits(vocab_size), (1 << 64) - 1
    if len(ctx) * bits <= 64:
        key = 0
        for x in ctx:
            key = (key << bits) | int(x)
        return key
    h = 0x9E3779B97F4A7C15
    for x in ctx:
        h = ((h ^ (int(x) + 1)) * 0xBF58476D1CE4E5B9) & mask
    h ^= h >> 31
    h = (h * 0x94D049BB133111EB) & mask
    return h ^ (h >> 29)


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

TABLE_ARRAYS = ("keys", "offsets", "ids", "counts", "totals", "bids", "bcounts")


class _Table:
    """Arrays of one context length (possibly memory-mapped). ``bids``/``bcounts`` hold
    the same pairs as ``ids``/``counts`` but sorted by id within each context, so the
    count of one token is a binary search."""

    def __init__(self, keys: np.ndarray, offsets: np.ndarray, ids: np.ndarray, counts: np.ndarray,
                 totals: np.ndarray, bids: np.ndarray, bcounts: np.ndarray):
        self.keys, self.offsets, self.ids, self.counts = keys, offsets, ids, counts
        self.totals, self.bids, self.bcounts = totals, bids, bcounts

    def find(self, key: int) -> int:
        k = np.uint64(key)
        i = int(np.searchsorted(self.keys, k))
        return i if i < self.keys.size and self.keys[i] == k else -1


class _Level:
    """One matched context: its candidate slices, discount, total and interpolation weight."""

    def __init__(self, t: _Table, i: int, D: float):
        lo, hi = int(t.offsets[i]), int(t.offsets[i + 1])
        self.ids, self.counts = t.ids[lo:hi], t.counts[lo:hi]
        self.bids, self.bcounts = t.bids[lo:hi], t.bcounts[lo:hi]
        self.total, self.D, self.n = int(t.totals[i]), D, hi - lo
        self.beta = 1.0

    def terms(self, counts: np.ndarray) -> np.ndarray:
        # the one expression for beta_c * a_c(w), shared by every path (bitwise-equal results)
        return self.beta * ((counts - self.D) / self.total)


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
        # cached per temperature: cumsum of a_0^(1/T) along the support.
        self.a0 = np.asarray(unigram, dtype=np.float64) / self.tokens
        support = np.nonzero(unigram)[0]
        self.support = support[np.lexsort((support, -np.asarray(unigram)[support]))].astype(np.int64)
        self.a0_support = self.a0[self.support]
        self._pow_cache: dict[float, tuple[np.ndarray, float]] = {}

    # ----- building and storage -----------------------------------------------------------
    @classmethod
    def build(cls, docs: np.ndarray | Sequence[np.ndarray], vocab_size: int, order: int = 4,
              min_count: int = 1) -> "NgramModel":
        """Count a corpus: one int array, or a list of documents (contexts never span two).
        Pairs (context, next) seen fewer than ``min_count`` times are dropped (c >= 1)."""
        if isinstance(docs, np.ndarray):
            docs = [docs]
        docs = [np.asarray(d, dtype=np.int64).ravel() for d in docs if len(d)]
        corpus = np.concatenate(docs) if docs else np.zeros(0, np.int64)
        if corpus.size == 0:
            raise ValueError("empty corpus")
        if corpus.min() < 0 or corpus.max() >= vocab_size:
            raise ValueError(f"token ids must lie in [0, {vocab_size})")
        sizes = [d.size for d in docs]
        starts = np.cumsum([0] + sizes[:-1])
        in_doc = np.arange(corpus.size) - np.repeat(starts, sizes)  # offset inside its document
        unigram = np.bincount(corpus, minlength=vocab_size).astype(np.int64)
        tables, discounts = [], []
        for c in range(1, order):
            pos = np.nonzero(in_doc >= c)[0]
            windows = np.stack([corpus[pos - c + j] for j in range(c)], axis=1)
            t, d = _count_table(context_keys(windows, vocab_size), corpus[pos], min_count)
            tables.append(t)
            discounts.append(d)
        return cls(order, vocab_size, unigram, tables, discounts, min_count)

    def save(self, out_dir: str | Path) -> None:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        np.save(out / "unigram.npy", np.asarray(self.unigram, np.int64))
        for c, t in enumerate(self.tables, start=1):
            for name in TABLE_ARRAYS:
                np.save(out / f"c{c}_{name}.npy", np.asarray(getattr(t, name)))
        bits = key_bits(self.vocab_size)
        meta = {"format_version": FORMAT_VERSION, "order": self.order, "vocab_size": self.vocab_size,
                "min_count": self.min_count, "tokens": self.tokens, "discounts": self.discounts,
                "contexts": [int(t.keys.size) for t in self.tables],
                "pairs": [int(t.ids.size) for t in self.tables],
                "key": {"bits": bits, "exact_up_to_context": 64 // bits}}
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
        # np.asarray: plain ndarray views of the maps (np.memmap's subclass hooks are slow)
        tables = [_Table(*(np.asarray(np.load(d / f"c{c}_{n}.npy", mmap_mode=mode)) for n in TABLE_ARRAYS))
                  for c in range(1, meta["order"])]
        return cls(meta["order"], meta["vocab_size"], np.load(d / "unigram.npy"), tables, meta["discounts"],
                   meta.get("min_count", 1), meta["tokens"])

    # ----- probabilities --------------------------------------------------------------------
    def _chain(self, context: np.ndarray) -> tuple[float, list[_Level]]:
        """beta_0 and the matched levels c = 1..c* (each with its beta_c), such that
        P(w) = beta_0 a_0(w) + sum_c beta_c a_c(w), always summed in that order."""
        ctx = [int(x) for x in np.asarray(context).ravel()[-(self.order - 1):]] if self.order > 1 else []
        levels: list[_Level] = []
        for c in range(1, min(self.order - 1, len(ctx)) + 1):
            t = self.tables[c - 1]
            i = t.find(context_key(ctx[-c:], self.vocab_size))
            if i < 0:
                break
            levels.append(_Level(t, i, self.discounts[c - 1]))
        beta = 1.0
        for lv in reversed(levels):
            lv.beta = beta
            beta *= lv.D * lv.n / lv.total
        return beta, levels

    def _exact(self, beta0: float, levels: list[_Level], ws: np.ndarray) -> np.ndarray:
        """P(w) for the ids ``ws`` (float64), by binary search in each level's id-sorted slice."""
        p = beta0 * self.a0[ws]
        ws32 = ws.astype(np.int32)  # the haystack's dtype: a mismatch would copy the whole slice
        for lv in levels:
            j = np.minimum(np.searchsorted(lv.bids, ws32), lv.n - 1)
            hit = lv.bids[j] == ws32
            if hit.any():
                p[hit] += lv.terms(lv.bcounts[j[hit]])
        return p

    def _dense(self, context: np.ndarray) -> np.ndarray:
        beta0, levels = self._chain(context)
        p = beta0 * self.a0
        for lv in levels:
            p[lv.ids] += lv.terms(lv.counts)
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
            p = p ** (1.0 / temperature)
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
    def _candidates(self, beta0: float, levels: list[_Level], want: int) -> tuple[np.ndarray, np.ndarray]:
        """Ids and exact P of a candidate set that contains the ``want`` most probable
        tokens (Fagin's threshold algorithm): take the first M entries of every
        count-sorted list (the unigram's included); a token outside all prefixes has
        P <= sum_c beta_c a_c(M-th entry of c), so stop once the want-th best float32
        value beats that bound, else double M. Cost ~ M log(list), not the list lengths."""
        lists = [(self.support, None)] + [(lv.ids, lv) for lv in levels]
        M = max(2 * want, 16)
        while True:
            cand = np.unique(np.concatenate([np.asarray(ids[:M], np.int64) for ids, _ in lists]))
            p = self._exact(beta0, levels, cand)
            bound, exhausted = 0.0, True
            for ids, lv in lists:
                if len(ids) > M:
                    exhausted = False
                    bound += beta0 * self.a0_support[M] if lv is None else float(lv.terms(lv.counts[M]))
            if exhausted or cand.size < want:
                if exhausted:
                    return cand, p
            else:
                kth = np.partition(p.astype(np.float32), cand.size - want)[cand.size - want]
                if np.float32(bound * (1 + 1e-9)) < kth:
                    return cand, p
            M *= 4

    def _pow_unigram(self, inv_t: float) -> tuple[np.ndarray, float]:
        """cumsum of a_0^(1/T) over the support order, and its total (cached per T)."""
        hit = self._pow_cache.get(inv_t)
        if hit is None:
            cum = np.cumsum(self.a0_support ** inv_t)
            hit = (cum, float(cum[-1]))
            if len(self._pow_cache) >= 8:
                self._pow_cache.clear()
            self._pow_cache[inv_t] = hit
        return hit

    def _step(self, context: np.ndarray, topk: int, temperature: float, rng: np.random.Generator | None,
              forced: int) -> tuple[int, float, np.ndarray, np.ndarray]:
        """(chosen token, its probability, top-k ids, top-k probs); probabilities at T
        (T = 1 when greedy). q_T ranks like P, so the top-k come from P's candidates."""
        beta0, levels = self._chain(context)
        want = max(topk, 1)
        cand, p = self._candidates(beta0, levels, want)
        inv_t = 1.0 / temperature if temperature > 0 else 1.0
        tempered = None
        if inv_t == 1.0:
            z = 1.0  # P is normalized; the dense path does not renormalize either
        else:
            tempered = self._tempered(beta0, levels, inv_t)
            z = tempered[2]
        top_ids, top_p = top_k(cand.astype(np.int32), (p ** inv_t / z).astype(np.float32), want)
        if forced >= 0:
            tok = forced
        elif temperature <= 0:
            tok = int(top_ids[0])
        else:
            rng = rng if rng is not None else np.random.default_rng()
            tok = (self._sample_t1(beta0, levels, rng) if tempered is None
                   else self._sample_tempered(*tempered, inv_t, rng))
        tok_p = 0.0
        if 0 <= tok < self.vocab_size:
            pt = float(self._exact(beta0, levels, np.array([tok], np.int64))[0])
            tok_p = float(np.float32(pt ** inv_t / z)) if pt > 0 else 0.0
        return tok, tok_p, top_ids[:topk], top_p[:topk]

    def _sample_t1(self, beta0: float, levels: list[_Level], rng: np.random.Generator) -> int:
        """Exact draw from P (T = 1) as the mixture it is: pick a level by its mass
        (beta_0 for the unigram, beta_c (n - D u) / n for c >= 1), then a token of that
        level by (count - D), resp. the unigram count."""
        masses = [beta0] + [lv.beta * (lv.total - lv.D * lv.n) / lv.total for lv in levels]
        cm = np.cumsum(masses)
        lvl = min(int(np.searchsorted(cm, rng.random() * cm[-1], side="right")), len(masses) - 1)
        if lvl == 0:
            cum, tot = self._pow_unigram(1.0)
            return int(self.support[min(int(np.searchsorted(cum, rng.random() * tot, side="right")),
                                        self.support.size - 1)])
        lv = levels[lvl - 1]
        cum = np.cumsum(lv.counts - lv.D)
        return int(lv.ids[min(int(np.searchsorted(cum, rng.random() * cum[-1], side="right")), lv.n - 1)])

    def _tempered(self, beta0: float, levels: list[_Level], inv_t: float) -> tuple[np.ndarray, np.ndarray, float]:
        """For T != 1: U = all ids of the matched lists with exact P^(1/T), and the
        normalizer z = sum_U P^(1/T) + beta_0^(1/T) (sum_support a_0^(1/T) - sum_U a_0^(1/T)),
        since outside U P = beta_0 a_0. Cost ~ the lowest matched list's length."""
        if levels:
            U = np.unique(np.concatenate([np.asarray(lv.ids, np.int64) for lv in levels]))
        else:
            U = np.zeros(0, np.int64)
        w = self._exact(beta0, levels, U) ** inv_t
        _, a_t = self._pow_unigram(inv_t)
        rest = max(a_t - float(np.sum(self.a0[U] ** inv_t)), 0.0)
        return U, w, float(w.sum()) + beta0 ** inv_t * rest

    def _sample_tempered(self, U: np.ndarray, w: np.ndarray, z: float, inv_t: float,
                         rng: np.random.Generator) -> int:
        """Exact draw from P^(1/T)/z: from U by w, else from the rest of the support by
        a_0^(1/T) (rejection from the whole unigram^(1/T), explicit after 64 misses)."""
        m_u = float(w.sum())
        r = rng.random() * z
        if r < m_u:
            return int(U[min(int(np.searchsorted(np.cumsum(w), r, side="right")), U.size - 1)])
        cum, a_t = self._pow_unigram(inv_t)
        for _ in range(64):
            j = min(int(np.searchsorted(cum, rng.random() * a_t, side="right")), self.support.size - 1)
            w_id = int(self.support[j])
            i = np.searchsorted(U, w_id)
            if not (i < U.size and U[i] == w_id):
                return w_id
        in_u = np.isin(self.support, U)
        rest = self.support[~in_u]
        wr = np.cumsum(self.a0_support[~in_u] ** inv_t)
        return int(rest[min(int(np.searchsorted(wr, rng.random() * wr[-1], side="right")), rest.size - 1)])

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
        n_ctx = self.order - 1
        hist = list(np.asarray(context, dtype=np.int64).ravel()[-n_ctx:]) if n_ctx else []
        tokens = np.zeros(k, np.int32)
        token_probs = np.zeros(k, np.float32)
        topk_ids = np.full((k, topk), -1, np.int32)
        topk_probs = np.zeros((k, topk), np.float32)
        for i in range(k):
            tok, p, ids, probs = self._step(np.asarray(hist, np.int64), topk, temperature, rng, forced_l[i])
            tokens[i], token_probs[i], topk_ids[i], topk_probs[i] = tok, p, ids, probs
            if n_ctx:
                hist = (hist + [tok])[-n_ctx:]
        return tokens, token_probs, topk_ids, topk_probs


def _count_table(keys: np.ndarray, nxt: np.ndarray, min_count: int) -> tuple[_Table, float]:
    """Group (context key, next token) pairs into a _Table and estimate the discount
    (from the unpruned count-of-counts)."""
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
    pk, pt, pc = pk[keep], pt[keep], pc[keep]  # still sorted by (key, id): the by-id layout
    first = np.ones(pk.size, bool)
    first[1:] = pk[1:] != pk[:-1]
    cstarts = np.nonzero(first)[0]
    offsets = np.append(cstarts, pk.size).astype(np.int64)
    totals = np.add.reduceat(pc, cstarts).astype(np.int64) if pk.size else np.zeros(0, np.int64)
    o = np.lexsort((pt, -pc, pk))  # per context: count desc, id asc
    return _Table(pk[cstarts].astype(np.uint64), offsets, pt[o].astype(np.int32), pc[o].astype(np.int32), totals,
                  pt.astype(np.int32), pc.astype(np.int32)), D


def bench_draft(model, contexts: Sequence[np.ndarray], k: int = 8, topk: int = 8, temperature: float = 0.0,
                seed: int = 0) -> float:
    """Mean microseconds of CPU time per drafted token over ``contexts`` (k tokens each,
    one thread). CPU time, not wall time, so a busy machine does not inflate it."""
    rng = np.random.default_rng(seed)
    model.draft(contexts[0], k, topk, temperature, rng)  # warm caches and page in the mmap
    t0 = time.process_time()
    for c in contexts:
        model.draft(c, k, topk, temperature, rng)
    return (time.process_time() - t0) / (len(contexts) * k) * 1e6
