"""Batch scheduling: cost-model fit and greedy batch selection under caps."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosine.control.costs import CostModel
from cosine.control.scheduling import PendingRequest, select_batch


def req(rid, seq=100, tokens=5, wait=0.0, cache=None):
    return PendingRequest(rid=rid, seq_len=seq, planned_tokens=tokens, waiting_s=wait,
                          cache_tokens=seq + tokens if cache is None else cache)


# -- cost model ------------------------------------------------------------------------------
def test_fit_recovers_known_linear_cost():
    rng = np.random.default_rng(0)
    cv, cd = (0.01, 0.0004, 2e-6), (0.002, 0.003, 1e-7)
    sv, sd = [], []
    for _ in range(40):
        b, t, s = int(rng.integers(1, 9)), int(rng.integers(1, 33)), int(rng.integers(16, 1024))
        sv.append((b, t, s, cv[0] + cv[1] * b * t + cv[2] * b * s))
        sd.append((b, t, s, cd[0] + cd[1] * b * t + cd[2] * b * s))
    m = CostModel.fit(sv, sd)
    assert m.verify_coef == pytest.approx(cv, rel=1e-6, abs=1e-12)
    assert m.draft_coef == pytest.approx(cd, rel=1e-6, abs=1e-12)
    assert m.verify_s(4, 10, 500) == pytest.approx(cv[0] + cv[1] * 40 + cv[2] * 2000)
    assert m.draft_s(2, 3, 100) == pytest.approx(cd[0] + cd[1] * 6 + cd[2] * 200)


def test_fit_with_noise_is_close_and_non_negative():
    rng = np.random.default_rng(1)
    samples = []
    for _ in range(200):
        b, t, s = int(rng.integers(1, 9)), int(rng.integers(1, 33)), int(rng.integers(16, 1024))
        samples.append((b, t, s, 0.02 + 0.001 * b * t + rng.normal(0, 1e-4)))  # no seq_len term
    m = CostModel.fit(samples, [])
    c0, c1, c2 = m.verify_coef
    assert c0 == pytest.approx(0.02, abs=2e-4) and c1 == pytest.approx(0.001, rel=0.02)
    assert min(m.verify_coef) >= 0.0 and c2 < 1e-6
    assert m.draft_coef == CostModel.default().draft_coef  # no draft samples: default kept


def test_fit_never_goes_negative():
    # Timings that decrease with work would fit a negative slope; clipped instead.
    samples = [(1, t, 10, 0.05 - 0.001 * t) for t in range(1, 20)]
    m = CostModel.fit(samples, samples)
    assert min(m.verify_coef) >= 0 and min(m.draft_coef) >= 0
    assert all(m.verify_s(b, t, 10) >= 0 for b in (1, 4) for t in (1, 50))


def test_fit_collinear_profile_prefers_constant_term():
    # The start-up profile uses one sequence length and batch 1: batch*seq_len is a constant column.
    samples = [(1, n, 32, 0.01 + 0.002 * n) for n in (1, 2, 4, 8, 1, 4)]
    m = CostModel.fit(samples, [])
    assert m.verify_coef == pytest.approx((0.01, 0.002, 0.0), abs=1e-9)


def test_default_is_sane():
    d = CostModel.default()
    assert d.verify_s(1, 1, 10) > 0 and d.verify_s(8, 10, 10) > d.verify_s(1, 10, 10)
    assert d.draft_s(1, 4, 10) > d.draft_s(1, 1, 10) > 0


# -- select_batch ----------------------------------------------------------------------------
def test_latency_bound_requests_first():
    pool = [req("fast", tokens=9, wait=0.01), req("old", tokens=1, wait=5.0), req("older", tokens=1, wait=7.0)]
    out = select_batch(pool, CostModel.default(), max_batch=2, max_verify_tokens=100, memory_budget_tokens=10**6,
                       latency_weight=0.0, latency_bound_s=1.0)
    assert out == ["older", "old"]
    # without a bound, pure throughput prefers the request with the most tokens per second
    out = select_batch(pool, CostModel.default(), max_batch=1, max_verify_tokens=100, memory_budget_tokens=10**6,
                       latency_weight=0.0, latency_bound_s=0.0)
    assert out == ["fast"]
    out = select_batch(pool, CostModel.default(), max_batch=1, max_verify_tokens=100, memory_budget_tokens=10**6,
                       latency_weight=1.0, latency_bound_s=None)
    assert out == ["older"]


def test_caps_skip_to_requests_that_fit_and_none_when_nothing_fits():
    pool = [req("huge", tokens=50, wait=9), req("a", tokens=5, wait=1), req("b", tokens=5, wait=1)]
    out = select_batch(pool, CostModel.default(), 8, max_verify_tokens=12, memory_budget_tokens=10**6,
                       latency_weight=1.0, latency_bound_s=2.0)
    assert out == ["a", "b"]  # urgent "huge" cannot fit; ties by rid
    assert select_batch([req("huge", tokens=50)], CostModel.default(), 8, 12, 10**6, 0.5) == []
    assert select_batch([], CostModel.default(), 8, 12, 10**6, 0.5) == []
    mem = select_batch([req("x", cache=600), req("y", cache=500), req("z", cache=400)], CostModel.default(), 8,
                       100, memory_budget_tokens=1000, latency_weight=0.5)
    assert sum({"x": 600, "y": 500, "z": 400}[r] for r in mem) <= 1000 and mem
    with pytest.raises(ValueError):
        select_batch([], CostModel.default(), 8, 12, 10**6, 1.5)


def test_deterministic_tie_break_by_rid():
    pool = [req(r) for r in ("d", "b", "c", "a")]
    out = select_batch(pool, CostModel.default(), 2, 100, 10**6, 0.5)
    assert out == ["a", "b"]
    assert select_batch(list(reversed(pool)), CostModel.default(), 2, 100, 10**6, 0.5) == out


pending = st.builds(req, st.text("abcdefgh", min_size=1, max_size=2), st.integers(1, 2000), st.integers(1, 80),
                    st.floats(0, 10), st.integers(1, 3000))


@settings(max_examples=200, deadline=None)
@given(st.lists(pending, max_size=20), st.integers(1, 10), st.integers(1, 200), st.integers(1, 20000),
       st.floats(0, 1), st.floats(0, 5))
def test_select_batch_respects_caps(pool, max_batch, max_tokens, memory, lw, bound):
    cost = CostModel.default()
    out = select_batch(pool, cost, max_batch, max_tokens, memory, lw, bound)
    by = {}
    for p in pool:
        by.setdefault(p.rid, p)  # duplicates: the first one counts
    assert len(out) == len(set(out)) <= max_batch
    assert set(out) <= set(by)
    assert sum(by[r].planned_tokens for r in out) <= max_tokens
    assert sum(by[r].cache_tokens for r in out) <= memory
    fits_alone = any(p.planned_tokens <= max_tokens and p.cache_tokens <= memory for p in by.values())
    assert bool(out) == fits_alone
    # urgent requests that fit are never passed over for non-urgent ones while room remains
    if bound > 0 and out:
        urgent_out = [r for r in out if by[r].waiting_s > bound]
        assert out[:len(urgent_out)] == urgent_out
    assert out == select_batch(list(reversed(list(by.values()))), cost, max_batch, max_tokens, memory, lw, bound)
