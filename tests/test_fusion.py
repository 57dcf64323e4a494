"""Confidence-based token fusion: rules, cut-off and the CoSine tree it builds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cosine.control.drafting.fusion import (FUSION_RULES, Candidate, DraftStep, fuse_step, make_rule,
                                   max_confidence, prob_sum, vote)
from cosine.tree import TokenTree

C = Candidate


def test_max_confidence_and_tie_break():
    assert max_confidence([C(0, 3, 0.2), C(1, 4, 0.7), C(2, 5, 0.5)]) == C(1, 4, 0.7)
    assert max_confidence([C(2, 3, 0.5), C(1, 9, 0.5), C(1, 4, 0.5)]) == C(1, 4, 0.5)
    assert max_confidence([]) is None


def test_prob_sum_and_vote():
    cands = [C(0, 1, 0.4), C(1, 1, 0.4), C(2, 2, 0.7)]
    assert max_confidence(cands).token == 2
    win = prob_sum(cands)
    assert (win.token, win.drafter) == (1, 0) and np.isclose(win.prob, 0.8)
    # a drafter listing the same token twice counts once (its best prob)
    assert prob_sum([C(0, 1, 0.4), C(0, 1, 0.4), C(2, 2, 0.7)]).token == 2
    v = vote(cands)
    assert v.token == 1 and np.isclose(v.prob, 0.4)
    assert vote([C(0, 1, 0.3), C(1, 2, 0.6)]).token == 2  # one vote each: higher mass wins
    assert prob_sum([]) is None and vote([]) is None


def test_make_rule_registry_and_cutoff():
    assert set(FUSION_RULES) >= {"max", "prob_sum"}
    with pytest.raises(ValueError, match="prob_sum"):
        make_rule("nope")
    with pytest.raises(ValueError):
        make_rule("max", min_confidence=-0.1)
    r = make_rule("max", min_confidence=0.5)
    assert r([C(0, 1, 0.4), C(1, 2, 0.45)]) is None
    assert r([C(0, 1, 0.4), C(1, 2, 0.5)]) == C(1, 2, 0.5)
    rs = make_rule("prob_sum", min_confidence=0.7)
    assert rs([C(0, 1, 0.4), C(1, 1, 0.4)]).token == 1     # summed confidence 0.8 passes
    assert make_rule("max")([]) is None


def test_fuse_step_stop_and_keep():
    t0 = TokenTree.root(9)
    step = DraftStep([C(0, 1, 0.1), C(1, 2, 0.2)])          # lists are accepted
    assert isinstance(step.candidates, tuple)
    rule = make_rule("max", min_confidence=0.5)
    t, node = fuse_step(t0, 0, step, rule)
    assert node is None and t.n == 3                         # candidates kept for verification
    t, node = fuse_step(t0, 0, step, rule, keep_on_stop=False)
    assert node is None and t == t0
    t, node = fuse_step(t0, 0, step, make_rule("max"))
    assert node == 2 and t.tokens[node] == 2 and t.proposers[node] == 1


def test_fuse_step_shared_token_records_most_confident_proposer():
    t, node = fuse_step(TokenTree.root(0), 0, DraftStep((C(0, 5, 0.3), C(1, 5, 0.6), C(2, 6, 0.5))),
                        max_confidence)
    assert t.n == 3 and t.tokens[node] == 5 and t.proposers[node] == 1 and np.isclose(t.probs[node], 0.6)


steps_strategy = st.lists(  # rounds of draft steps: per step, (drafter, token, prob) candidates
    st.lists(st.tuples(st.integers(0, 3), st.integers(0, 4), st.sampled_from([0.1, 0.3, 0.5, 0.7, 0.9])),
             min_size=1, max_size=6),
    min_size=1, max_size=6)


@settings(max_examples=150, deadline=None)
@given(steps=steps_strategy, rule_name=st.sampled_from(sorted(FUSION_RULES)))
def test_fusion_builds_union_with_fused_path(steps, rule_name):
    rule = make_rule(rule_name)
    tree, parent, fused_path = TokenTree.root(42), 0, [0]
    for raw in steps:
        step = DraftStep(tuple(C(*c) for c in raw))
        before = tree.n
        tree, fused = fuse_step(tree, parent, step, rule)
        # every candidate is a child of the current fused node, one node per distinct token
        kids = {int(tree.tokens[c]): c for c in tree.children(parent)}
        assert set(kids) == {c.token for c in step.candidates}
        assert tree.n == before + len(kids)
        for tok, node in kids.items():
            mine = [c for c in step.candidates if c.token == tok]
            best = min(mine, key=lambda c: (-np.float32(c.prob), c.drafter))
            assert tree.proposers[node] == best.drafter and np.isclose(tree.probs[node], best.prob)
        # the fused node carries the rule's winner; for "max" that is the most confident candidate
        assert fused is not None and tree.parents[fused] == parent
        assert tree.tokens[fused] == rule(step.candidates).token
        if rule_name == "max":
            assert np.isclose(tree.probs[fused], max(c.prob for c in step.candidates))
        parent = fused
        fused_path.append(fused)
    assert tree.path(parent) == fused_path                   # fused tokens form one path
    on_path = set(fused_path)
    for u in range(tree.n):                                  # and only path nodes have children
        if u not in on_path:
            assert not tree.children(u)


def test_weighted_rule_trusts_track_record_over_raw_confidence() -> None:
    from cosine.control.drafting.fusion import weighted

    cands = [Candidate(0, 11, 0.6), Candidate(1, 22, 0.8)]
    base = make_rule("max")
    assert base(cands).token == 22
    assert weighted(base, {0: 0.9, 1: 0.3})(cands).token == 11  # 0.54 > 0.24
    assert weighted(base, None) is base
    tree, node = fuse_step(TokenTree.root(5), 0, DraftStep(cands), weighted(base, {0: 0.9, 1: 0.3}))
    assert int(tree.tokens[node]) == 11
    assert np.allclose(sorted(tree.probs[1:]), [0.6, 0.8])  # the tree keeps the raw probabilities


def test_calibration_learns_which_drafter_to_trust() -> None:
    """A drafter that states 0.9 but is right 20% of the time loses fusion to one that
    states 0.6 and is right 80% of the time, once the verified examples say so; per domain."""
    from cosine.control.drafting.fusion import Calibration, max_confidence

    cal = Calibration()
    cands = [Candidate(0, 10, 0.9), Candidate(1, 11, 0.6)]
    assert cal.rule(max_confidence, "code")(cands).token == 10  # no evidence: stated probabilities
    rng = np.random.default_rng(0)
    for _ in range(400):
        cal.observe("code", 0, 0.9, bool(rng.random() < 0.2))
        cal.observe("code", 1, 0.6, bool(rng.random() < 0.8))
    assert abs(cal.confidence("code", 0, 0.9) - 0.2) < 0.06 and abs(cal.confidence("code", 1, 0.6) - 0.8) < 0.06
    assert cal.rule(max_confidence, "code")(cands).token == 11
    assert cal.rule(max_confidence, "prose")(cands).token == 10  # another domain: no evidence yet
    assert cal.confidence("code", 0, 0.1) == pytest.approx(0.1)  # an unseen bin keeps the stated p
    t = cal.table()["code"][0]
    assert sum(n for _, n in t) == 400


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.floats(0, 1), st.booleans()), max_size=60), st.floats(0, 1))
def test_calibration_confidence_is_a_probability(obs, p) -> None:
    from cosine.control.drafting.fusion import Calibration

    cal = Calibration(cap=10.0)
    for d, q, ok in obs:
        cal.observe("x", d, q, ok)
    for d in range(3):
        assert 0.0 <= cal.confidence("x", d, p) <= 1.0
    with pytest.raises(ValueError):
        Calibration(edges=(0.5, 0.2))


def test_agreement_labels_every_candidate_on_its_own_prefix() -> None:
    from cosine.control.drafting.trees import Proposal, agreement

    # root 0 -> a(1) -> b(2); root -> c(3). Target argmax per node: after root 7, after a 8.
    argmax = np.array([7, 8, 5, 6])
    cands = [Proposal(drafter=d, token=t, prob=p, parent=u) for d, p, t, u in
             [(0, 0.9, 7, 0), (0, 0.8, 9, 1), (1, 0.4, 3, 0), (1, 0.5, 8, 1)]]
    assert agreement(cands, argmax) == [(0, 0.9, True), (0, 0.8, False), (1, 0.4, False), (1, 0.5, True)]


def test_calibrated_confidences_prune_the_drafter_that_is_never_right() -> None:
    from cosine.control.drafting.fusion import Calibration

    cal = Calibration()
    for _ in range(200):
        cal.observe("code", 1, 0.9, False)   # drafter 1 states 0.9 and is always wrong
    # root -> a (drafter 0, 0.9) ; root -> b (drafter 1, 0.9)
    t = TokenTree(np.array([0, 1, 2]), np.array([-1, 0, 0]), np.array([-1, 0, 1]), np.array([1.0, 0.9, 0.9]))
    conf = np.array([1.0] + [cal.confidence("code", int(t.proposers[i]), float(t.probs[i])) for i in (1, 2)])
    assert conf[0] == 1.0 and conf[1] == pytest.approx(0.9) and conf[2] < 0.05
    tt, kept = t.prune(conf, 0.1)
    assert kept.tolist() == [0, 1]   # the node of the drafter that is never right goes
