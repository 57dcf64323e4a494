"""Worker failures with real processes: a drafter killed with SIGKILL mid-generation must
not change any output (greedy stays identical to autoregressive), it is re-admitted after
it restarts, and a dead verifier fails requests with `unavailable` instead of hanging."""

from __future__ import annotations

import signal
import time

import pytest

from cosine.client import Client, Unavailable
from cosine.control.cluster import LocalCluster

from conftest import write_cluster_config

PROMPT = [5, 17, 12, 8, 9]


def wait_admitted(c: Client, drafter: str, why: str, timeout_s: float = 30.0) -> None:
    """Until serve reports ``drafter`` alive; cosine rounds drive the probes that admit it."""
    deadline = time.monotonic() + timeout_s
    while not c.health()["drafters"][drafter]:
        assert time.monotonic() < deadline, why
        c.generate(PROMPT, max_tokens=4, mode="cosine")
        time.sleep(0.2)


@pytest.fixture()
def cluster(control_engines, tmp_path):
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               controller={"worker_timeout_s": 1.5,
                                           # a dead verifier's requests wait this long
                                           # (parked) before they fail `unavailable`
                                           "verifier_grace_s": 0.5})
    with LocalCluster(cfg) as c:
        yield c


def test_drafter_killed_mid_generation(cluster):
    with Client(cluster.endpoint, timeout_s=60) as c:
        ref = c.generate(PROMPT, max_tokens=100, mode="autoregressive")
        s = c.generate(PROMPT, max_tokens=100, mode="cosine", stream=True)
        it = iter(s)
        got = list(next(it).token_ids)
        # freeze the verifier so the kill lands mid-generation (well under worker_timeout_s)
        verifier = cluster.workers["verifier-0"].proc
        verifier.send_signal(signal.SIGSTOP)
        try:
            cluster.kill_worker("good", signal.SIGKILL)
        finally:
            time.sleep(0.2)
            verifier.send_signal(signal.SIGCONT)
        for ch in it:
            got += ch.token_ids
        assert s.result is not None and s.result.token_ids == got == ref.token_ids
        # the other drafter and target-only rounds carry on; specinfer too
        for mode in ("cosine", "specinfer", "speculative"):
            assert c.generate(PROMPT, max_tokens=40, mode=mode).token_ids == ref.token_ids[:40]
        assert c.health()["drafters"]["good"] is False
        # restart it: probing re-admits it, with an empty cache
        cluster.start_worker("good")
        wait_admitted(c, "good", "restarted drafter was not re-admitted")
        r = c.generate(PROMPT, max_tokens=100, mode="cosine")
        assert r.token_ids == ref.token_ids
        assert "good" in r.stats["drafters_used"]


def test_a_killed_drafter_is_noticed_at_once_not_after_worker_timeout(control_engines, tmp_path):
    """A draft call in flight to a drafter that dies fails when its connection closes, not
    after worker_timeout_s (60 s here): the stream goes on within seconds, unchanged."""
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               controller={"worker_timeout_s": 60.0})
    with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=120) as c:
        ref = c.generate(PROMPT, max_tokens=200, mode="autoregressive")
        s = c.generate(PROMPT, max_tokens=200, mode="cosine", stream=True)
        it = iter(s)
        got = list(next(it).token_ids)
        good = cluster.workers["good"].proc
        good.send_signal(signal.SIGSTOP)  # its next draft call waits for an answer...
        time.sleep(1.0)
        t0 = time.monotonic()
        cluster.kill_worker("good", signal.SIGKILL)  # ... and its connection closes
        for ch in it:
            got += ch.token_ids
        assert time.monotonic() - t0 < 15.0, "serve waited for the dead drafter's timeout"
        assert s.result is not None and s.result.token_ids == got == ref.token_ids
        assert c.health()["drafters"]["good"] is False


def test_all_drafters_dead_then_verifier_dead(cluster):
    with Client(cluster.endpoint, timeout_s=60) as c:
        ref = c.generate(PROMPT, max_tokens=30, mode="autoregressive")
        cluster.kill_worker("good")
        cluster.kill_worker("poor")
        for mode in ("cosine", "specinfer", "speculative"):
            assert c.generate(PROMPT, max_tokens=30, mode=mode).token_ids == ref.token_ids
        cluster.kill_worker("verifier-0")
        t0 = time.monotonic()
        with pytest.raises(Unavailable, match="verifier-0"):
            c.generate(PROMPT, max_tokens=30, mode="cosine")
        assert time.monotonic() - t0 < 10


def test_serve_sigterm_fails_running_requests(cluster):
    with Client(cluster.endpoint, timeout_s=30) as c:
        s = c.generate(PROMPT, max_tokens=200, mode="autoregressive", stream=True)
        it = iter(s)
        next(it)
        verifier = cluster.workers["verifier-0"].proc
        verifier.send_signal(signal.SIGSTOP)  # hold the generation mid-way
        try:
            cluster.serve.proc.send_signal(signal.SIGTERM)
            time.sleep(0.3)
        finally:
            verifier.send_signal(signal.SIGCONT)
        with pytest.raises(Unavailable, match="shutting down"):
            for _ in it:
                pass
        assert cluster.serve.proc.wait(20) == 0


def test_serve_starts_while_a_drafter_is_down(control_engines, tmp_path):
    """A drafter host that is down at start-up does not keep serve from serving: it starts
    with the drafter marked dead, outputs stay exact, and the drafter joins once it is up."""
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               controller={"worker_timeout_s": 1.5,
                                           # a dead verifier's requests wait this long
                                           # (parked) before they fail `unavailable`
                                           "verifier_grace_s": 0.5})
    with LocalCluster(cfg, defer=("good",), serve_args=["--connect-timeout", "2"]) as cl, \
            Client(cl.endpoint, timeout_s=60) as c:
        ref = c.generate(PROMPT, max_tokens=30, mode="autoregressive")
        assert c.health()["drafters"] == {"good": False, "poor": True}
        assert c.generate(PROMPT, max_tokens=30, mode="cosine").token_ids == ref.token_ids
        cl.start_worker("good")
        wait_admitted(c, "good", "a drafter that came up late was never admitted")
        r = c.generate(PROMPT, max_tokens=30, mode="speculative", drafters=["good"])
        assert r.token_ids == ref.token_ids and r.stats["drafters_used"] == ["good"]
