"""Prompt-lookup drafter."""

from __future__ import annotations

import numpy as np
import pytest

from cosine.workers.lookup import LookupDrafter


def test_finds_repeated_span_and_proposes_continuation() -> None:
    hist = np.array([5, 6, 7, 8, 9, 1, 2, 5, 6, 7])
    lk = LookupDrafter(max_ngram=3)
    m, ids, counts = lk.match(hist)
    assert m == 3 and list(ids) == [8] and list(counts) == [1]
    toks, probs, tids, tprobs = lk.draft(hist, 4, 2)
    assert list(toks) == [8, 9, 1, 2]
    assert probs[0] == pytest.approx(3 / 4)  # lam = mN / (mN + 1) with m = 3, N = 1
    assert list(tids[0]) == [8, -1] and tprobs[0, 1] == 0


def test_counts_and_ties() -> None:
    hist = np.array([1, 4, 1, 3, 1, 4, 1])  # after 1: 4 twice, 3 once (m = 1: "4 1" -> 3... )
    lk = LookupDrafter(max_ngram=1)
    m, ids, counts = lk.match(hist)
    assert m == 1 and list(ids) == [3, 4] and list(counts) == [1, 2]
    q = lk.full_distribution(hist, 6)
    lam = 3 / 4
    np.testing.assert_allclose(q, [0, 0, 0, lam / 3, 2 * lam / 3, 0], rtol=1e-6)
    assert lk.draft(hist, 1, 2)[0][0] == 4 == np.argmax(q)
    tie = np.array([2, 9, 2, 7, 2])
    assert lk.draft(tie, 1, 2)[0][0] == 7  # 7 and 9 once each: lower id


def test_nothing_to_propose() -> None:
    lk = LookupDrafter()
    hist = np.array([1, 2, 3, 4])
    toks, probs, tids, tprobs = lk.draft(hist, 3, 2)
    assert list(toks) == [-1, -1, -1] and probs.sum() == 0 and (tids == -1).all() and tprobs.sum() == 0
    assert lk.full_distribution(hist, 8).sum() == 0
    assert lk.draft(np.array([3]), 2, 1)[0].tolist() == [-1, -1]
    # a forced token resumes drafting: [1,2,3,4,1] matches "1" -> 2, then "1 2" -> 3
    toks, probs, _, _ = lk.draft(hist, 3, 1, forced=[1, -1, -1])
    assert list(toks) == [1, 2, 3] and probs[0] == 0


def test_sampling_draws_from_normalized_counts() -> None:
    hist = np.array([1, 4, 1, 3, 1, 4, 1])
    lk = LookupDrafter(max_ngram=1)
    rng = np.random.default_rng(0)
    draws = [lk.draft(hist, 1, 1, temperature=1.0, rng=rng)[0][0] for _ in range(3000)]
    assert np.mean(np.array(draws) == 4) == pytest.approx(2 / 3, abs=0.03)
    q = lk.full_distribution(hist, 6, temperature=0.5)  # counts^2: 1 and 4 -> 1/5, 4/5
    np.testing.assert_allclose(q / q.sum(), [0, 0, 0, 0.2, 0.8, 0], rtol=1e-6)
