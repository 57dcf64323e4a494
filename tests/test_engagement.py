"""Engaging model drafters (control/engagement.py): a drafter that must prefill each prompt
is brought in only when the time it saves over the tokens left pays for that prefill."""

from __future__ import annotations

import pytest

from cosine.control.drafting.engagement import FREE, Engagement


def test_declared_drafter_is_engaged_before_any_data():
    assert Engagement().decide("code", "m", declared=True, tokens_left=64, prefill_s=0.8)


def test_undeclared_drafter_is_probed_once_after_a_free_baseline():
    e = Engagement()
    assert not e.decide("german", "m", declared=False, tokens_left=64, prefill_s=0.8)  # no baseline yet
    e.observe("german", FREE, tokens=2.0, seconds=0.4)
    assert e.decide("german", "m", declared=False, tokens_left=64, prefill_s=0.8)      # the probe
    assert not e.decide("german", "m", declared=False, tokens_left=64, prefill_s=0.8)  # only once
    assert e.decide("german", "other", declared=False, tokens_left=64, prefill_s=0.8)  # per drafter
    e.observe("prose", FREE, tokens=2.0, seconds=0.4)
    assert e.decide("prose", "m", declared=False, tokens_left=64, prefill_s=0.8)       # per domain


@pytest.mark.parametrize("g_free,g_model,left,prefill,engage", [
    (5.0, 10.0, 64, 0.8, True),    # saves 64 * 0.1 = 6.4 s > 0.8 s
    (5.0, 5.5, 64, 0.8, True),     # saves 64 * 0.0182 = 1.16 s > 0.8 s
    (5.0, 5.5, 32, 0.8, False),    # saves 0.58 s < 0.8 s: too few tokens left to repay it
    (5.0, 5.0, 1000, 0.01, False),  # no faster: never worth a prefill
    (6.0, 5.0, 64, 0.0, False),    # slower than the weight-free drafters
])
def test_data_decide_by_time_saved_against_prefill(g_free, g_model, left, prefill, engage):
    e = Engagement()
    for dom, declared in (("code", True), ("german", False)):  # data override the declaration
        e.observe(dom, FREE, tokens=g_free, seconds=1.0)
        e.observe(dom, "m", tokens=g_model, seconds=1.0)
        assert e.decide(dom, "m", declared, left, prefill) is engage, dom


def test_goodput_is_a_decayed_ratio_of_sums_and_snapshot_names_the_arms():
    e = Engagement(keep=0.5)
    e.observe("docs", FREE, 1.0, 1.0)
    e.observe("docs", FREE, 3.0, 1.0)      # sums: tokens 0.5 + 3 = 3.5, seconds 0.5 + 1 = 1.5
    e.observe("docs", "m", 4.0, 0.0)       # no time measured: ignored
    assert e.goodput("docs", FREE) == pytest.approx(3.5 / 1.5)
    assert e.goodput("docs", "m") is None and e.goodput("code", FREE) is None
    assert e.snapshot() == {"docs": {"free": pytest.approx(3.5 / 1.5)}}
    with pytest.raises(ValueError, match="keep must be in"):
        Engagement(keep=1.0)
