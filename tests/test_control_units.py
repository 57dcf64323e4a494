"""Pure parts of the control plane: drafter cache bookkeeping, emit/stop rules, detokenization."""

from __future__ import annotations

from hypothesis import given, strategies as st

from cosine.control.request import Detokenizer, GenParams, Request
from cosine.control.proxies import plan_feed

WORDS = {i: w for i, w in enumerate(["a", "b", "c", " ", "é"[0], "x", "yz", "\n", "st", "op"])}


def decode(ids: list[int]) -> str:
    return "".join(WORDS[i] for i in ids)


def make_req(stop=(), max_tokens=100, eos=frozenset({99}), limit=1000) -> Request:
    prompt = [0, 1]
    return Request(rid="r", client=None, prompt=prompt, params=GenParams(max_tokens=max_tokens, stop=tuple(stop)),
                   eos=eos, context_limit=limit, detok=Detokenizer(decode, prompt))


def test_plan_feed_convention():
    # fresh cache: feed everything, no rollback
    assert plan_feed([], [1, 2, 3]) == (None, [1, 2, 3])
    # cache holds context[:-1]: only the root is fed
    assert plan_feed([1, 2], [1, 2, 3]) == (None, [3])
    # a losing drafted token is rolled back, the fused one fed
    assert plan_feed([1, 2, 3, 9], [1, 2, 3, 4, 5]) == (3, [4, 5])
    # cache already holds the whole context: keep all but the root, re-feed it
    assert plan_feed([1, 2, 3], [1, 2, 3]) == (2, [3])


@given(st.lists(st.integers(0, 3), max_size=8), st.lists(st.integers(0, 3), min_size=1, max_size=8))
def test_plan_feed_reaches_context(cached, context):
    keep, feed = plan_feed(cached, context)
    kept = cached if keep is None else cached[:keep]
    assert kept + feed == context and len(feed) >= 1


def test_accept_length_and_eos():
    r = make_req(max_tokens=3)
    text, ids = r.accept([5, 5, 5, 5])
    assert ids == [5, 5, 5] and r.finish_reason == "length" and text == "xxx"
    r = make_req()
    text, ids = r.accept([5, 99, 5])
    assert ids == [5] and r.finish_reason == "eos" and r.committed == [0, 1, 5]


def test_stop_string_across_rounds_is_held_back_and_cut():
    r = make_req(stop=("stop",))
    t1, _ = r.accept([0, 8])       # "a" + "st": "st" may start "stop" -> held back
    assert t1 == "a" and not r.done
    t2, _ = r.accept([9, 0])      # "op" completes it
    assert r.finish_reason == "stop" and r.text == "a" and t2 == ""
    r = make_req(stop=("zz",))
    r.accept([6])                 # "yz": "z" held back
    t, _ = r.accept([5])
    assert r.text == "yzx" and not r.done


def test_context_limit_finishes_with_length():
    r = make_req(limit=4)
    _, ids = r.accept([5, 5, 5])
    assert ids == [5, 5] and r.finish_reason == "length"


def test_detokenizer_concatenation_equals_decode():
    d = Detokenizer(decode, [0])
    ids = [1, 3, 6, 7, 2, 5]
    assert "".join(d.push(t) for t in ids) + d.flush() == decode(ids)
