"""Adaptive speculation control: goodput-driven draft length, on/off switch, pipeline
bias, verify-token cap."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosine.config import SpeculationConfig
from cosine.control.speculation import DraftPlan, SpeculationController, expected_tokens


def simulate(sc: SpeculationController, rid: str, alpha: float, rounds: int = 60, step_s: float = 0.002,
             verify_base: float = 0.02, verify_tok: float = 0.0005, seed: int = 0) -> list[DraftPlan]:
    """Seeded environment: each drafted position is accepted with probability alpha
    given its parent was; verify and draft times are linear in the work."""
    rng = np.random.default_rng(seed)
    plans = []
    for _ in range(rounds):
        p = sc.plan(rid)
        plans.append(p)
        if not p.speculate:
            sc.observe_plain(verify_base + verify_tok)
            continue
        k = p.draft_len
        acc = 0
        while acc < k and rng.random() < alpha:
            acc += 1
        n = 1 + k * p.tree_width
        sc.observe(rid, drafted=n - 1, accepted=min(acc, k), draft_s=step_s * k,
                   verify_s=verify_base + verify_tok * n)
    return plans


def test_expected_tokens():
    assert expected_tokens(0.0, 5) == 1.0
    assert expected_tokens(1.0, 5) == 6.0
    assert expected_tokens(0.5, 2) == pytest.approx(1.75)


@given(st.floats(0, 0.999), st.integers(0, 16))
def test_expected_tokens_monotone(alpha, k):
    assert 1.0 <= expected_tokens(alpha, k) <= expected_tokens(alpha, k + 1) <= k + 2


def test_draft_len_moves_up_with_high_acceptance_and_down_with_low():
    hi, lo = SpeculationController(), SpeculationController()
    for sc in (hi, lo):
        sc.observe_plain(0.0205)
    k_hi = np.mean([p.draft_len for p in simulate(hi, "a", alpha=0.95)[-40:]])
    k_lo = np.mean([p.draft_len for p in simulate(lo, "a", alpha=0.2)[-40:]])
    assert k_hi > 5 and k_lo < 3, (k_hi, k_lo)
    assert hi.rates_global[0] > 0.7 and lo.rates_global[0] < 0.4


def test_goodput_not_acceptance_drives_draft_len():
    # Same acceptance, but drafting is expensive relative to verifying: shorter drafts.
    cheap, dear = SpeculationController(disable_below_ratio=0.0), SpeculationController(disable_below_ratio=0.0)
    k_cheap = np.mean([p.draft_len for p in simulate(cheap, "a", alpha=0.8, step_s=0.0005)[-40:]])
    k_dear = np.mean([p.draft_len for p in simulate(dear, "a", alpha=0.8, step_s=0.02)[-40:]])
    assert k_cheap > k_dear + 1, (k_cheap, k_dear)


def test_best_draft_len_is_argmax_of_goodput():
    sc = SpeculationController(min_draft_len=1, max_draft_len=8)
    st_ = sc._state("r")
    st_.est, st_.draft_step_s = (0.7, 0.8), 0.003
    sc.observe_plain(0.02)
    sc.observe_plain(0.02)  # one tree size only: per-token slope falls back to verify_token_frac
    g = {k: expected_tokens(0.7, k, 0.8) / (sc.verify_s(1 + k) + 0.003 * k) for k in range(1, 9)}
    assert sc.best_draft_len("r") == max(g, key=g.get)


def test_two_rate_expected_tokens():
    assert expected_tokens(0.5, 3, 0.5) == pytest.approx(expected_tokens(0.5, 3))  # equal rates: geometric
    assert expected_tokens(0.0, 5, 1.0) == 1.0
    assert expected_tokens(1.0, 5, 1.0) == 6.0
    assert expected_tokens(0.5, 4, 1.0) == pytest.approx(3.0)  # half the rounds take all 4


def test_streaky_acceptance_asks_for_longer_drafts():
    """Rounds that accept all or nothing (easy stretches) make a later position almost
    sure once the first is in: the two-rate estimate drafts longer than the geometric one
    would at the same mean acceptance."""
    sc = SpeculationController(disable_below_ratio=0.0, max_draft_len=8)
    sc.observe_plain(0.25)
    for i in range(40):
        p = sc.plan("a")
        acc = p.draft_len if i % 2 else 0  # all or nothing
        sc.observe("a", drafted=p.draft_len, accepted=acc, draft_s=0.02 * p.draft_len,
                   verify_s=0.25 + 0.008 * p.draft_len)
    a1, *later = sc.rates("a")
    assert 0.35 < a1 < 0.65 and min(later) > 0.85
    assert sc.plan("a").draft_len >= 6


@given(st.floats(0, 1), st.floats(0, 1), st.integers(0, 12), st.integers(1, 4))
def test_per_position_expected_tokens_match_the_closed_forms(alpha, later, k, n):
    """A constant sequence of later rates is the two-rate model; the last rate repeats."""
    assert expected_tokens(alpha, k, [later] * n) == pytest.approx(expected_tokens(alpha, k, later))
    assert expected_tokens(alpha, k, [alpha] * n) == pytest.approx(expected_tokens(alpha, k))


def test_deep_positions_are_measured_apart_from_shallow_ones():
    """Acceptance that rises with depth (a drafter that got the first tokens of an easy
    stretch gets the rest): each position's rate is learned on its own, so the plan drafts
    longer than one shared later rate would allow."""
    rng = np.random.default_rng(1)
    truth = [0.6, 0.6] + [0.95] * 6
    sc = SpeculationController(disable_below_ratio=0.0, max_draft_len=8, alpha_keep=0.95)
    sc.observe_plain(0.25)
    ks = []
    for _ in range(200):
        k = sc.plan("a").draft_len
        ks.append(k)
        acc = 0
        while acc < k and rng.random() < truth[acc]:
            acc += 1
        sc.observe("a", drafted=k, accepted=acc, draft_s=0.025 * k, verify_s=0.23 + 0.015 * (1 + k), depth=k)
    rates = sc.rates("a")
    assert rates[0] == pytest.approx(0.6, abs=0.15) and rates[1] == pytest.approx(0.6, abs=0.2), rates
    assert min(rates[2:5]) > 0.8, rates
    # the two-rate model's view of the same rounds: one later rate of about 0.8
    two = expected_tokens(rates[0], 8, 0.8) / (0.23 + 0.015 * 9 + 0.025 * 8)
    assert np.mean(ks[-100:]) >= 5, np.mean(ks[-100:])
    assert two < expected_tokens(rates[0], 8, rates[1:]) / (0.23 + 0.015 * 9 + 0.025 * 8)


def test_pruned_rounds_charge_draft_time_to_every_step_drafted():
    """Pruning may leave a 1-deep tree from a 4-step draft: the draft time paid for 4
    steps, and charging it to one would make every later draft look 4x dearer."""
    pruned, whole = SpeculationController(), SpeculationController()
    pruned.observe("a", drafted=1, accepted=1, draft_s=0.1, verify_s=0.25, depth=1, steps=4)
    assert pruned._state("a").draft_step_s == pytest.approx(0.025)
    whole.observe("a", drafted=1, accepted=1, draft_s=0.1, verify_s=0.25, depth=1)
    assert whole._state("a").draft_step_s == pytest.approx(0.1)


def test_gain_floors_price_time_at_least_at_plain_decodings_rate():
    """A node's verify time could earn tokens at the request's goodput, and never at less
    than plain decoding's: one bad first round (goodput 1.4 tok/s) must not make every
    node look worth verifying. Before its first round a request is priced by the cost
    model's prediction from its domain's rates, not left unpruned."""
    sc = SpeculationController()
    for n, t in ((1, 0.25), (5, 0.31), (9, 0.37)):
        sc.observe_plain(t) if n == 1 else sc.observe("warm", drafted=n - 1, accepted=n - 1, draft_s=0.025 * (n - 1),
                                                     verify_s=t, depth=n - 1)
    node_s = sc.verify_s(2) - sc.verify_s(1)
    sc.plan("new", "code")
    node, step = sc.gain_floors("new")
    assert node == pytest.approx(sc.predicted_goodput("new") * node_s) and node > 0
    sc.observe("new", drafted=15, accepted=0, draft_s=0.22, verify_s=0.48, depth=8)  # goodput 1.4 tok/s
    assert sc.goodput("new") < sc.plain_rate
    node_s = sc.verify_s(2) - sc.verify_s(1)  # the round refitted the verify line
    node, step = sc.gain_floors("new")
    assert node == pytest.approx(sc.plain_rate * node_s)
    assert step == pytest.approx(sc.plain_rate * (node_s + sc._state("new").draft_step_s))
    # a request never planned (e.g. kept plain by the batch gate) is priced at plain's rate
    # and the global draft step (this raised inside the controller round at concurrency 4)
    node, step = sc.gain_floors("never-planned")
    assert node == pytest.approx(sc.plain_rate * node_s)
    assert step == pytest.approx(sc.plain_rate * (node_s + sc.draft_step_global))


def test_short_drafts_do_not_starve_the_later_rate():
    """A later position is measured only when one is drafted. A request whose rounds all
    draft one token and accept it must not stay at one token because earlier requests
    missed at later positions: without evidence its later rate follows its first."""
    sc = SpeculationController(disable_below_ratio=0.0, max_draft_len=8)
    sc.observe_plain(0.25)
    for _ in range(30):  # another request: first position in, the second always out
        sc.observe("old", drafted=4, accepted=1, draft_s=0.1, verify_s=0.3, depth=4)
    assert sc.rates_global[1] < 0.3
    for _ in range(12):  # this request: every one-token draft accepted
        sc.observe("new", drafted=1, accepted=1, draft_s=0.03, verify_s=0.26, depth=1)
    a1, a2, *_ = sc.rates("new")
    assert a1 > 0.85 and a2 >= a1 - 1e-9, (a1, a2)
    assert (sc.rate_at("new", 1), sc.rate_at("new", 2), sc.rate_at("new", 99)) == (a1, a2, sc.rates("new")[-1])
    assert sc.best_draft_len("new") >= 3


def test_new_request_starts_from_its_domains_rates():
    """A new request's first plan comes from its domain's acceptance, not from whichever
    domain ran last: after easy code and hard German rounds, a fresh code request drafts
    longer than a fresh German one, and an unseen domain starts from the global rates."""
    sc = SpeculationController(disable_below_ratio=0.0, max_draft_len=8)
    sc.observe_plain(0.25)
    for i in range(20):
        sc.plan(f"c{i % 2}", "code")
        sc.observe(f"c{i % 2}", drafted=6, accepted=6, draft_s=0.15, verify_s=0.35, depth=6)
        sc.plan(f"g{i % 2}", "german")
        sc.observe(f"g{i % 2}", drafted=6, accepted=0, draft_s=0.15, verify_s=0.35, depth=6)
    code, german = sc.prior("code"), sc.prior("german")
    assert code[0] > 0.8 > 0.2 > german[0], (code, german)
    assert sc.prior("math") == sc.rates_global
    # first plans, before the new requests' own rounds: from the domain's rates
    assert sc.plan("first-code", "code").draft_len > sc.plan("first-german", "german").draft_len
    for rid, dom, acc in (("new-code", "code", 1), ("new-german", "german", 0)):
        sc.plan(rid, dom)
        sc.observe(rid, drafted=1, accepted=acc, draft_s=0.03, verify_s=0.3, depth=1)  # one round: goodput known
    assert sc.rates("new-code") > sc.rates("new-german")
    assert sc.plan("new-code").draft_len > sc.plan("new-german").draft_len


def test_speculation_turns_off_when_slower_than_plain_and_reprobes():
    sc = SpeculationController(probe_every=5, min_rounds=2, disable_below_ratio=0.9)
    sc.observe_plain(0.01)  # plain: 100 tok/s
    assert sc.plan("a").speculate
    sc.observe("a", drafted=4, accepted=0, draft_s=0.02, verify_s=0.012)  # 1 tok / 0.032 s
    assert not sc.is_off("a")  # one round is not enough evidence
    sc.plan("a")
    sc.observe("a", drafted=4, accepted=0, draft_s=0.02, verify_s=0.012)
    assert sc.is_off("a") and sc.goodput("a") < 0.9 * sc.plain_rate
    plans = [sc.plan("a") for _ in range(5)]
    assert [p.speculate for p in plans] == [False] * 4 + [True]  # probe on the 5th round
    assert plans[0] == DraftPlan(False, 0, 1)
    # the probe goes well this time: speculation stays on
    for _ in range(3):
        sc.observe("a", drafted=4, accepted=4, draft_s=0.004, verify_s=0.012)
        assert sc.plan("a").speculate
    assert not sc.is_off("a")


def test_speculation_stays_on_when_faster_than_plain():
    sc = SpeculationController()
    sc.observe_plain(0.02)
    plans = simulate(sc, "a", alpha=0.7)
    assert all(p.speculate for p in plans)


def test_no_plain_measurement_never_turns_off_and_non_adaptive_is_fixed():
    sc = SpeculationController()
    for _ in range(10):
        sc.plan("a")
        sc.observe("a", 4, 0, 1.0, 1.0)
    assert not sc.is_off("a")
    fixed = SpeculationController(draft_len=3, tree_width=2, adaptive=False)
    fixed.observe_plain(0.001)
    for _ in range(5):
        fixed.observe("a", 6, 0, 1.0, 1.0)
        fixed.observe_pipeline(1.0, 0)
        assert fixed.plan("a") == DraftPlan(True, 3, 2)


def test_pipeline_bias_lengthens_then_widens_and_shortens():
    sc = SpeculationController(draft_len=4, max_draft_len=6, tree_width=1, max_tree_width=3, queue_high=2)
    assert sc.plan("a") == DraftPlan(True, 4, 1)
    for _ in range(4):
        sc.observe_pipeline(verifier_idle_frac=0.8, draft_queue_len=0)
    assert sc.plan("a") == DraftPlan(True, 6, 1)
    for _ in range(4):
        sc.observe_pipeline(0.8, 0)
    assert sc.plan("a") == DraftPlan(True, 6, 3)  # draft length maxed out: wider trees
    for _ in range(40):
        sc.observe_pipeline(0.8, 0)
    assert sc.bias == sc.bias_limit  # bounded
    for _ in range(60):
        sc.observe_pipeline(0.0, draft_queue_len=5)
    assert sc.plan("a") == DraftPlan(True, 1, 1)
    for _ in range(200):
        sc.observe_pipeline(0.1, 1)  # balanced: bias decays to 0
    assert sc.plan("a") == DraftPlan(True, 4, 1)


def test_trim_to_cap_shortens_largest_first():
    sc = SpeculationController(min_draft_len=1, max_verify_tokens=20)
    plans = {"big": DraftPlan(True, 8, 2), "mid": DraftPlan(True, 4, 1), "small": DraftPlan(True, 2, 1),
             "off": DraftPlan(False, 0, 1)}
    out = sc.trim_to_cap(plans)
    size = lambda p: 1 + p.draft_len * p.tree_width if p.speculate else 1  # noqa: E731
    assert sum(size(p) for p in out.values()) <= 20
    assert out["small"] == plans["small"] and out["mid"] == plans["mid"] and out["off"] == plans["off"]
    assert out["big"].draft_len < 8 and out["big"].speculate
    assert plans["big"] == DraftPlan(True, 8, 2)  # input untouched
    assert sc.trim_to_cap(plans, tokens_per_plan=lambda p: 1) == plans


def test_trim_to_cap_turns_off_largest_when_minimal_drafts_still_exceed():
    sc = SpeculationController(min_draft_len=2, max_verify_tokens=8)
    plans = {"a": DraftPlan(True, 6, 2), "b": DraftPlan(True, 3, 1), "c": DraftPlan(True, 2, 1)}
    out = sc.trim_to_cap(plans)
    assert sum(1 + p.draft_len * p.tree_width if p.speculate else 1 for p in out.values()) <= 8
    # everyone at min length and width 1 needs 9 tokens; the tie a/b/c -> smallest rid "a" goes off
    assert out["a"] == DraftPlan(False, 0, 1)
    assert out["b"] == DraftPlan(True, 2, 1) and out["c"] == DraftPlan(True, 2, 1)


@settings(max_examples=100, deadline=None)
@given(st.dictionaries(st.text("abcdef", min_size=1, max_size=3),
                       st.tuples(st.booleans(), st.integers(1, 8), st.integers(1, 4)), max_size=12),
       st.integers(1, 120), st.integers(1, 3))
def test_trim_to_cap_properties(raw, cap, min_len):
    sc = SpeculationController(min_draft_len=min_len, draft_len=max(min_len, 4), max_draft_len=8,
                               max_verify_tokens=cap)
    plans = {rid: DraftPlan(s, max(d, min_len), w) if s else DraftPlan(False, 0, 1) for rid, (s, d, w) in raw.items()}
    out = sc.trim_to_cap(plans)
    size = lambda p: 1 + p.draft_len * p.tree_width if p.speculate else 1  # noqa: E731
    assert set(out) == set(plans)
    assert sum(size(p) for p in out.values()) <= max(cap, len(plans))
    for rid, p in out.items():
        q = plans[rid]
        assert size(p) <= size(q)
        assert not p.speculate or p.draft_len >= min(min_len, q.draft_len)
    if sum(size(p) for p in plans.values()) <= cap:
        assert out == plans
    # largest first: a plan left untouched while it could still be shortened is never
    # more than one draft step larger than any plan that was shortened
    trimmed = [r for r in out if out[r] != plans[r] and out[r].speculate]
    for u in out:
        if out[u] == plans[u] and out[u].speculate and out[u].draft_len > min_len:
            assert all(size(out[u]) <= size(out[x]) + plans[x].tree_width for x in trimmed)


def test_forget_and_from_config():
    cfg = SpeculationConfig(draft_len=3, min_draft_len=2, max_draft_len=5, tree_width=2, adaptive=True,
                            disable_below_ratio=0.5)
    sc = SpeculationController.from_config(cfg, max_verify_tokens=64, probe_every=4)
    assert (sc.draft_len, sc.min_draft_len, sc.max_draft_len, sc.tree_width, sc.max_verify_tokens,
            sc.disable_below_ratio, sc.probe_every) == (3, 2, 5, 2, 64, 0.5, 4)
    assert sc.plan("x") == DraftPlan(True, 3, 2)
    sc.forget("x")
    sc.forget("never")
    assert "x" not in sc._reqs
    with pytest.raises(ValueError):
        SpeculationController(draft_len=9, max_draft_len=8)


def test_speculation_pays_compares_round_goodput() -> None:
    from cosine.control.speculation import speculation_pays

    plans = {f"r{i}": DraftPlan(True, 4, 1) for i in range(4)}
    alphas = {r: 0.7 for r in plans}
    flat = lambda n: 0.01  # noqa: E731 - memory-bound: a bigger forward costs the same
    linear = lambda n: 0.01 * n  # noqa: E731 - compute-bound: cost grows with tokens
    free_draft = lambda k: 0.0  # noqa: E731
    assert speculation_pays(plans, alphas, flat, free_draft)
    assert not speculation_pays(plans, alphas, linear, free_draft)
    # one request on a CPU-like curve (T=8 costs 1.5x T=1): speculation pays with cheap drafts
    cpu = lambda n: 0.28 * (1 + 0.5 * (n - 1) / 7)  # noqa: E731
    one = {"a": DraftPlan(True, 4, 1)}
    assert speculation_pays(one, {"a": 0.7}, cpu, lambda k: 0.05 * k)
    assert not speculation_pays(one, {"a": 0.1}, cpu, lambda k: 0.05 * k)
    # unmeasured costs never turn it off; nothing speculating -> False
    assert speculation_pays(plans, alphas, lambda n: 0.0, free_draft)
    assert not speculation_pays({"a": DraftPlan(False, 0, 1)}, {}, cpu, free_draft)
    # ratio 0 (disable_below_ratio = 0) keeps speculation on whatever it costs
    assert speculation_pays(plans, alphas, linear, free_draft, ratio=0.0)
    # a one-off cost (drafters prefilling new prompts) can tip it; two-rate acceptance works too
    assert speculation_pays(one, {"a": (0.7, 0.9)}, cpu, lambda k: 0.05 * k)
    assert not speculation_pays(one, {"a": (0.7, 0.9)}, cpu, lambda k: 0.05 * k, once_s=2.0)


# ----- GoodputGate: the batch-level switch learnt from measured rounds -----------------

def _run_gate(gate, batch: int, rates: dict[bool, float], rounds: int, prior: bool = True) -> list[bool]:
    """Drive the gate for ``rounds`` rounds of 1 s where each regime commits rates[regime] tokens."""
    out = []
    for _ in range(rounds):
        spec = gate.decide(batch, lambda: prior)
        out.append(spec)
        gate.observe(int(rates[spec]), 1.0)
    return out


def test_gate_follows_prior_then_tries_the_other_then_plays_the_better():
    from cosine.control.speculation import GoodputGate

    g = GoodputGate(window=4, explore_every=5)
    seq = _run_gate(g, 1, {True: 3, False: 5}, 4 * 12, prior=True)
    windows = [seq[i:i + 4] for i in range(0, len(seq), 4)]
    assert all(len(set(w)) == 1 for w in windows)           # one regime per window
    regimes = [w[0] for w in windows]
    assert regimes[0] is True and regimes[1] is False         # prior first, then the unmeasured one
    # plain measured better (5 > 3 tokens/s): played, except every 5th window explores
    assert [r for i, r in enumerate(regimes[2:], start=3) if i % 5 != 0] == [False] * 8
    assert all(regimes[i - 1] is True for i in (5, 10))
    assert g.snapshot() == {"1:plain": 5.0, "1:spec": 3.0}


def test_gate_learns_each_batch_size_bucket_apart():
    from cosine.control.speculation import GoodputGate

    g = GoodputGate(window=2, explore_every=100)
    _run_gate(g, 1, {True: 8, False: 4}, 8)   # one request: speculation pays
    _run_gate(g, 5, {True: 6, False: 12}, 8)  # four to seven: plain batched decoding pays
    assert GoodputGate.bucket(5) == 4 and GoodputGate.bucket(1) == 1 and GoodputGate.bucket(16) == 16
    assert _run_gate(g, 1, {True: 8, False: 4}, 4) == [True] * 4
    assert _run_gate(g, 6, {True: 6, False: 12}, 4) == [False] * 4


def test_gate_notices_when_speculation_stops_paying():
    from cosine.control.speculation import GoodputGate

    g = GoodputGate(window=2, explore_every=4, keep=0.5)
    assert _run_gate(g, 1, {True: 10, False: 4}, 22)[-4:] == [True] * 4  # windows 10, 11: no exploring
    # acceptance collapses (e.g. the domain changed): speculation now commits 2 tokens/s
    seq = _run_gate(g, 1, {True: 2, False: 4}, 40)
    assert seq[-8:].count(False) >= 6 and g.rate[(1, True)] < g.rate[(1, False)]


def test_gate_drops_windows_cut_short_by_a_batch_change():
    from cosine.control.speculation import GoodputGate

    g = GoodputGate(window=8)
    g.decide(1, lambda: True)
    g.observe(100, 1.0)                 # one round only, then the batch grows
    g.decide(2, lambda: False)
    assert g.rate == {}                 # 1 of 8 rounds is too little to judge a regime


def test_gain_floors_price_a_node_and_a_step_in_tokens():
    """A node is worth verifying when its expected tokens beat goodput x its verify cost;
    a draft step also pays the drafter's step. min_gain is a floor under both."""
    sc = SpeculationController(disable_below_ratio=0.0, min_gain=0.02)
    assert sc.gain_floors("r") == (0.02, 0.02)          # nothing measured: the floor only
    sc.observe_plain(0.2 + 0.025)                        # verify line: 0.2 s + 0.025 s per node
    for _ in range(6):
        sc.observe("r", drafted=4, accepted=2, draft_s=0.12, verify_s=0.2 + 0.025 * 5, depth=4)
        sc.observe("r", drafted=8, accepted=2, draft_s=0.12, verify_s=0.2 + 0.025 * 9, depth=4)
    g = sc.goodput("r")
    node, step = sc.gain_floors("r")
    assert node == pytest.approx(g * 0.025, rel=0.05)
    assert step == pytest.approx(g * (0.025 + 0.03), rel=0.05)
    assert SpeculationController(min_gain=0.5).gain_floors("r") == (0.5, 0.5)
