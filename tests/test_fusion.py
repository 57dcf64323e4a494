"""Confidence-based token fusion: rules, cut-off and the CoSine tree it builds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cosine.control.fusion import (FUSION_RULES, Candidate, DraftStep, fuse_step, make_rule,
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
    from cosine.control.fusion import weighted

    cands = [Candidate(0, 11, 0.6), Candidate(1, 22, 0.8)]
    base = make_rule("max")
    assert base(cands).token == 22
    assert weighted(base, {0: 0.9, 1: 0.3})(cands).token == 11  # 0.54 > 0.24
    assert weighted(base, None) is base
    tree, node = fuse_step(TokenTree.root(5), 0, DraftStep(cands), weighted(base, {0: 0.9, 1: 0.3}))
    assert int(tree.tokens[node]) == 11
    assert np.allclose(sorted(tree.probs[1:]), [0.6, 0.8])  # the tree keeps the raw probabilities
