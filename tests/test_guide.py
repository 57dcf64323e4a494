"""Guided drafting's pure functions (control/guide.py)."""

from __future__ import annotations

import numpy as np
import pytest

from cosine.control.drafting.guide import guide_length, pick_guide, still_valid


@pytest.mark.parametrize("seed", range(20))
def test_guide_length_is_the_prefix_whose_reach_stays_above(seed: int) -> None:
    rng = np.random.default_rng(seed)
    conf = rng.uniform(0.3, 1.0, size=10)
    min_reach = float(rng.uniform(0.05, 0.9))
    n = guide_length(conf, min_reach)
    reach = np.cumprod(conf)
    assert (reach[:n] >= min_reach).all()
    assert n == len(conf) or reach[n] < min_reach
    # a stricter bar never allows a longer guide
    assert guide_length(conf, min(1.0, min_reach * 1.5)) <= n


def test_guide_length_edges() -> None:
    assert guide_length([], 0.5) == 0
    assert guide_length([0.4, 1.0], 0.5) == 0  # the first token alone is too unlikely
    assert guide_length([1.0, 1.0, 1.0], 1.0) == 3


def test_pick_guide_takes_the_longest_usable_chain_and_respects_the_cap() -> None:
    chains = {2: ([7, 8, 9], [0.9, 0.9, 0.9]), 5: ([1, 2, 3, 4, 5], [0.99, 0.99, 0.99, 0.99, 0.1])}
    ident = lambda i, p: p  # noqa: E731
    assert pick_guide(chains, ident, 0.5, cap=8) == [1, 2, 3, 4]  # 0.99^4 >= 0.5, then x0.1 falls below
    assert pick_guide(chains, ident, 0.5, cap=2) == [7, 8]     # equal length: the lower drafter index
    assert pick_guide(chains, ident, 0.975, cap=8) == [1, 2]
    assert pick_guide(chains, ident, 0.999, cap=8) == []
    # the confidence passed in is the calibrated one, per drafter
    assert pick_guide(chains, lambda i, p: 1.0 if i == 2 else 0.0, 0.5, cap=8) == [7, 8, 9]


def test_still_valid_needs_the_same_token_and_a_further_proposal() -> None:
    chosen = [4, 5, 6]
    assert still_valid(chosen, 0, 4)
    assert not still_valid(chosen, 0, 9)   # the fused path left the chain
    assert still_valid(chosen, 1, 5)
    assert not still_valid(chosen, 2, 6)   # the op drafted no step after its last
