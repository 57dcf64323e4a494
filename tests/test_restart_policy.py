"""`cosine up`'s restart policy (control/restart.py): back-off and crash-loop decisions as a
pure function of a child's restart history."""

from __future__ import annotations

import signal

from hypothesis import given, settings, strategies as st

from cosine.control.restart import RestartPolicy, describe_exit, restart_delay

DEFAULT = RestartPolicy()

policies = st.builds(RestartPolicy, backoff_s=st.floats(0.01, 5), max_backoff_s=st.floats(5, 60),
                     max_restarts=st.integers(1, 10), window_s=st.floats(1, 300))


def test_defaults_double_from_one_second_and_give_up_after_five_restarts_in_a_minute():
    exits: list[float] = []
    delays = []
    now = 0.0
    while (d := restart_delay(exits, now, DEFAULT)) is not None:
        delays.append(d)
        exits.append(now)
        now += d  # a child that dies again the moment it is restarted
    assert delays == [1, 2, 4, 8, 16]
    assert now == 31  # the sixth crash, 31 s after the first: left down
    assert restart_delay([0, 1, 3], 100.0, DEFAULT) == 1  # crashes long ago: start over


def test_backoff_caps_at_max():
    p = RestartPolicy(backoff_s=1, max_backoff_s=30, max_restarts=100, window_s=1000)
    assert restart_delay([float(i) for i in range(10)], 10.0, p) == 30


@given(policies, st.lists(st.floats(0, 1000), max_size=30), st.floats(0, 1000))
def test_delay_is_bounded_and_none_exactly_when_the_window_is_full(p, exits, now):
    exits = [t for t in exits if t <= now]
    d = restart_delay(exits, now, p)
    recent = sum(1 for t in exits if now - t < p.window_s)
    assert (d is None) == (recent >= p.max_restarts)
    if d is not None:
        assert min(p.backoff_s, p.max_backoff_s) <= d <= p.max_backoff_s


@given(policies, st.lists(st.floats(0, 1000), max_size=30), st.floats(0, 1000))
def test_older_exits_do_not_matter_and_more_recent_ones_never_shorten_the_wait(p, exits, now):
    exits = [t for t in exits if t <= now]
    recent = [t for t in exits if now - t < p.window_s]
    assert restart_delay(exits, now, p) == restart_delay(recent, now, p)
    fewer = restart_delay(recent[1:], now, p)
    more = restart_delay(recent, now, p)
    assert more is None or (fewer is not None and fewer <= more)


@settings(max_examples=200)
@given(policies, st.lists(st.floats(0, 200), min_size=1, max_size=60))
def test_a_restart_storm_stops(p, run_times):
    """A child that keeps crashing (after any run times) gets at most max_restarts restarts in
    any window, and once one is refused the supervisor leaves it down."""
    exits: list[float] = []
    restarts: list[float] = []
    now = 0.0
    for run in run_times:
        d = restart_delay(exits, now, p)
        exits.append(now)
        if d is None:
            break
        restarts.append(now + d)
        now += d + run
    for t in restarts:
        assert sum(1 for u in restarts if t <= u < t + p.window_s) <= p.max_restarts
    if len(run_times) > p.max_restarts and all(r < p.window_s / (p.max_restarts + 1) - p.max_backoff_s
                                               for r in run_times):
        assert len(restarts) == p.max_restarts  # fast crashes: refused after exactly max_restarts


@given(policies, st.integers(1, 40))
def test_a_child_that_runs_longer_than_the_window_is_always_restarted(p, crashes):
    exits: list[float] = []
    now = 0.0
    for _ in range(crashes):
        assert restart_delay(exits, now, p) == min(p.max_backoff_s, p.backoff_s)
        exits.append(now)
        now += p.window_s + p.max_backoff_s  # restarted, then ran a whole window


def test_describe_exit():
    assert describe_exit(3) == "code 3"
    assert describe_exit(0) == "code 0"
    assert describe_exit(-signal.SIGKILL) == "signal SIGKILL"
    assert describe_exit(-signal.SIGSEGV) == "signal SIGSEGV"
    assert describe_exit(-200) == "signal 200"
