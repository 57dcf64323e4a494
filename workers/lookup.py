"""Prompt-lookup drafter: no weights, proposes continuations of spans that already occur
in the request's own tokens (prompt + output so far). Strong on code edits, quoting,
repeated identifiers and boilerplate.

Matching, at every step: for m = max_ngram down to min_ngram, take the history's last m
tokens and find every earlier occurrence of them that has a following token; the first
m with at least one occurrence wins (longest match). Over its N occurrences the
continuations are counted, n(w) = occurrences followed by w.

Distribution (documented contract):

    q_T(w)  = n(w)^(1/T) / sum_v n(v)^(1/T)      (the draw; T = 1 when greedy)
    lam     = m N / (m N + 1)                     (confidence: longer and more matches)
    reported(w) = lam * q_T(w)

The reported probabilities (``token_probs``, ``topk_probs``, ``full_distribution``) are
the confidence-scaled ones and sum to lam < 1, the rest of the vocabulary gets 0. The
tokens are drawn from q_T = reported / sum(reported), which is exactly what
``cosine.control.verify`` does with a q row (it normalizes), so stochastic verification
stays lossless. Greedy picks argmax n(w), ties to the lower id = np.argmax of
full_distribution.

"Nothing to propose": when no m-gram suffix occurs earlier, the step's token is -1, its
probability 0, its top-k row is all -1 / 0, and full_distribution is all zeros. Every
later step of that draft call is then also -1 (there is no token to continue from)
unless ``forced`` supplies that step's token, in which case drafting resumes from it.
Callers must cut a draft at its first -1 and must not send an all-zero q.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

from .ngram import check_forced, top_k

NO_TOKEN = -1


class LookupDrafter:
    def __init__(self, max_ngram: int = 3, min_ngram: int = 1, vocab_size: int | None = None,
                 max_history: int | None = None):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.vocab_size = vocab_size
        self.max_history = max_history  # search only the last N tokens (None = all)

    def match(self, history: np.ndarray) -> tuple[int, np.ndarray, np.ndarray]:
        """(m, candidate ids sorted ascending, their counts) for the longest matching
        suffix; m = 0 and empty arrays when nothing matches."""
        h = np.asarray(history, dtype=np.int64).ravel()
        if self.max_history is not None:
            h = h[-self.max_history:]
        n = h.size
        for m in range(min(self.max_ngram, n - 1), self.min_ngram - 1, -1):
            # window starting at a covers h[a:a+m] and is followed by h[a+m], a + m <= n - 1
            hit = h[0:n - m] == h[n - m]
            for t in range(1, m):
                hit &= h[t:n - m + t] == h[n - m + t]
            if hit.any():
                ids, counts = np.unique(h[m:n][hit], return_counts=True)
                return m, ids, counts
        return 0, np.zeros(0, np.int64), np.zeros(0, np.int64)

    def _probs(self, history: np.ndarray, temperature: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(ids, q_T float64, reported float32) over the matched candidates."""
        m, ids, counts = self.match(history)
        if m == 0:
            return ids, np.zeros(0), np.zeros(0, np.float32)
        w = counts.astype(np.float64)
        if temperature > 0 and temperature != 1.0:
            w = w ** (1.0 / temperature)
        q = w / w.sum()
        N = int(counts.sum())
        lam = m * N / (m * N + 1.0)
        return ids, q, (lam * q).astype(np.float32)

    def next_distribution(self, history: np.ndarray, topk: int,
                          temperature: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
        ids, _, rep = self._probs(history, temperature)
        return top_k(ids, rep, topk)

    def full_distribution(self, history: np.ndarray, vocab_size: int | None = None,
                          temperature: float = 1.0) -> np.ndarray:
        """Reported probabilities over the vocabulary (float32 [V]); sums to lam, or to 0
        when there is nothing to propose."""
        V = vocab_size if vocab_size is not None else self.vocab_size
        if V is None:
            raise ValueError("vocab_size is required")
        ids, _, rep = self._probs(history, temperature)
        out = np.zeros(V, np.float32)
        if ids.size and ids.max() >= V:
            raise ValueError(f"history holds token {int(ids.max())} >= vocab_size {V}")
        out[ids] = rep
        return out

    def draft(self, history: np.ndarray, k: int, topk: int, temperature: float = 0.0,
              rng: np.random.Generator | None = None, forced: Sequence[int] | None = None,
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Same outputs as NgramModel.draft; ``history`` is the request's whole token
        sequence ending with the root."""
        forced_l = check_forced(forced, k)
        if temperature > 0 and rng is None:
            rng = np.random.default_rng()
        hist = np.asarray(history, dtype=np.int64).ravel()
        tokens = np.full(k, NO_TOKEN, np.int32)
        token_probs = np.zeros(k, np.float32)
        topk_ids = np.full((k, topk), -1, np.int32)
        topk_probs = np.zeros((k, topk), np.float32)
        stuck = False  # an earlier step proposed nothing: no token to continue from
        for i in range(k):
            if stuck and forced_l[i] < 0:
                continue
            ids, q, rep = self._probs(hist, temperature)
            topk_ids[i], topk_probs[i] = top_k(ids, rep, topk)
            if forced_l[i] >= 0:
                tok = forced_l[i]
            elif ids.size == 0:
                stuck = True
                continue
            elif temperature > 0:
                tok = int(ids[min(np.searchsorted(np.cumsum(q), rng.random(), side="right"), ids.size - 1)])
            else:
                tok = int(top_k(ids, rep, 1)[0][0])
            j = np.searchsorted(ids, tok)
            tokens[i] = tok
            token_probs[i] = rep[j] if j < ids.size and ids[j] == tok else 0.0
            hist = np.append(hist, tok)
            stuck = False
        return tokens, token_probs, topk_ids, topk_probs
