"""control/metrics.py alone: the serve counters behind /metrics and the per-request figures."""

from __future__ import annotations

import math

from hypothesis import given, settings
from hypothesis import strategies as st

from cosine.control.metrics import Histogram, ServeMetrics


def test_histogram_buckets_are_cumulative_and_inclusive():
    h = Histogram((0.1, 1.0))
    for x in (0.05, 0.1, 0.5, 3.0):
        h.observe(x)
    snap = h.snapshot()
    assert snap["buckets"] == [[0.1, 2], [1.0, 3], [math.inf, 4]]  # le = "less or equal"
    assert snap["count"] == 4 and math.isclose(snap["sum"], 3.65)


def test_one_request_figures_and_counters():
    m = ServeMetrics(["a", "b"])
    m.on_admit("r", "cosine", 7, arrived=10.0)
    # round 1: a tree root + 3 nodes (a, a, b); nodes 1, 2 accepted (both a's)
    m.on_round("r", [-1, 0, 0, 1], [0, 1, 2], new_tokens=3, now=10.5)
    # round 2: plain (root only) -> no draft counted
    m.on_round("r", [-1], [0], new_tokens=1, now=10.7)
    # round 3: b's chain of 2, first accepted
    m.on_round("r", [-1, 1, 1], [0, 1], new_tokens=2, now=11.0)
    fig = m.on_finish("r", "length", now=12.0)
    assert fig == {"prompt_tokens": 7, "num_drafts": 2, "num_draft_tokens": 5, "num_accepted_tokens": 3,
                   "draft_acceptance_rate": 0.6, "mean_acceptance_length": 2.5}
    s = m.snapshot()
    assert s["prompt_tokens"] == 7 and s["generation_tokens"] == 6
    assert s["requests_finished"] == {"length": 1} and s["requests_failed"] == {}
    spec = {r["drafter"]: r for r in s["spec_decode"]}
    assert spec["a"] == {"mode": "cosine", "drafter": "a", "num_drafts": 1, "num_draft_tokens": 2,
                         "num_accepted_tokens": 2, "accepted_per_pos": [1, 1]}
    assert spec["b"] == {"mode": "cosine", "drafter": "b", "num_drafts": 2, "num_draft_tokens": 3,
                         "num_accepted_tokens": 1, "accepted_per_pos": [1]}
    assert s["num_trees"] == {"cosine": 2}
    assert s["time_to_first_token_s"]["count"] == 1 and math.isclose(s["time_to_first_token_s"]["sum"], 0.5)
    assert s["inter_token_latency_s"]["count"] == 2 and math.isclose(s["inter_token_latency_s"]["sum"], 0.5)
    assert s["e2e_request_latency_s"]["count"] == 1 and math.isclose(s["e2e_request_latency_s"]["sum"], 2.0)


def test_no_draft_gives_no_rates():
    m = ServeMetrics([])
    m.on_admit("r", "autoregressive", 3, arrived=0.0)
    m.on_round("r", [-1], [0], 1, now=1.0)
    fig = m.on_finish("r", "eos", now=1.0)
    assert fig["num_drafts"] == 0 and fig["draft_acceptance_rate"] is None and fig["mean_acceptance_length"] is None
    assert m.snapshot()["spec_decode"] == []


def test_failures_forget_the_request_and_unknown_rounds_are_ignored():
    m = ServeMetrics(["a"])
    m.on_error("overloaded")  # rejected before admission
    m.on_admit("r", "speculative", 4, arrived=0.0)
    m.on_round("r", [-1, 0], [0, 1], 2, now=0.1)
    m.on_error("cancelled")
    m.forget("r")
    m.on_round("r", [-1, 0], [0, 1], 2, now=0.2)  # a late round of a dropped request
    s = m.snapshot()
    assert s["requests_failed"] == {"overloaded": 1, "cancelled": 1}
    assert s["generation_tokens"] == 2 and s["e2e_request_latency_s"]["count"] == 0
    assert not m._live


def test_worker_deaths_and_restarts_count_changes_only():
    m = ServeMetrics(["d"])
    for alive in (True, False, False, True, True, False, True):
        m.on_worker("d", alive)
    s = m.snapshot()
    assert s["worker_deaths"] == {"d": 2} and s["worker_restarts"] == {"d": 2} and s["workers_down"] == []


def test_router_picks_and_fused_wins():
    m = ServeMetrics(["a", "b"])
    m.on_picks({"r1": ["a", "b"], "r2": ["a"]})
    m.on_fused_win(1)
    s = m.snapshot()
    assert s["router_picks"] == {"a": 2, "b": 1} and s["fused_wins"] == {"b": 1}


@st.composite
def rounds(draw):
    """A random tree (proposers) and an accepted path through it."""
    n = draw(st.integers(0, 6))
    proposers = [-1] + [draw(st.integers(0, 2)) for _ in range(n)]
    k = draw(st.integers(0, n))
    return proposers, list(range(k + 1)), draw(st.integers(0, k + 1))


@settings(max_examples=60, deadline=None)
@given(st.lists(rounds(), max_size=12), st.sampled_from(["speculative", "specinfer", "cosine"]))
def test_per_request_figures_add_up_to_the_counters(rs, mode):
    m = ServeMetrics(["a", "b", "c"])
    m.on_admit("r", mode, 5, arrived=0.0)
    for i, (prop, acc, new) in enumerate(rs):
        m.on_round("r", prop, acc, new, now=float(i + 1))
    fig = m.on_finish("r", "stop", now=100.0)
    spec = m.snapshot()["spec_decode"]
    assert sum(r["num_draft_tokens"] for r in spec) == fig["num_draft_tokens"] == sum(len(p) - 1 for p, _, _ in rs)
    assert sum(r["num_accepted_tokens"] for r in spec) == fig["num_accepted_tokens"]
    assert sum(sum(r["accepted_per_pos"]) for r in spec) == fig["num_accepted_tokens"]
    assert m.snapshot()["num_trees"].get(mode, 0) == fig["num_drafts"] <= sum(r["num_drafts"] for r in spec)
    assert m.snapshot()["generation_tokens"] == sum(new for _, _, new in rs)
    if fig["num_draft_tokens"]:
        assert 0.0 <= fig["draft_acceptance_rate"] <= 1.0
