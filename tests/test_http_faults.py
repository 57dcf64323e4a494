"""cosine-http when serve or a worker is in trouble: 429, 503 and 504 as the openai SDK's
exceptions, and the gateway's own clean stop on SIGTERM (what `cosine up` relies on).
One small cluster (verifier only, one pending request at most) for the module."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from cosine.client import Client

from conftest import API_KEYS, add_http, free_port, wait_line, write_cluster_config
from cosine.gateway.process import GatewayProcess

PROMPT = [5, 17, 12, 8, 9]


@pytest.fixture(scope="module")
def faulty(control_engines, tmp_path_factory):
    from cosine.control.cluster import LocalCluster

    cfg = write_cluster_config(tmp_path_factory.mktemp("http-faults") / "config.toml", control_engines["target"], {},
                               controller={"max_pending_requests": 1, "mode": "autoregressive",
                                           "verifier_grace_s": 0.5})
    # request_timeout_s over worker_timeout_s (3 s) + verifier_grace_s: a dead verifier's
    # parked request fails unavailable before the gateway gives up on serve
    base = add_http(cfg, free_port(), request_timeout_s=4.5)
    with LocalCluster(cfg) as c, GatewayProcess(cfg, base):
        yield c, cfg, base


def _sdk(base: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base + "/v1", api_key=API_KEYS[0], max_retries=0, timeout=60)


def _released(endpoint: str) -> dict:
    with Client(endpoint, timeout_s=30) as c:
        end = time.monotonic() + 30
        while (st := c.stats())["active_requests"] or st["queued_requests"]:
            assert time.monotonic() < end, "a request was never released"
            time.sleep(0.05)
        return st


def test_overloaded_serve_is_429(faulty):
    cluster, _, base = faulty
    sdk = _sdk(base)
    long = sdk.completions.create(model="target", prompt=PROMPT, max_tokens=250, stream=True,
                                  extra_body={"ignore_eos": True})
    it = iter(long)
    next(it)  # the one pending request this serve allows is running
    with pytest.raises(openai.RateLimitError, match="overloaded"):
        sdk.completions.create(model="target", prompt=PROMPT, max_tokens=4)
    assert sum(1 for _ in it) >= 1  # the running one is unaffected
    _released(cluster.endpoint)


def test_sigterm_stops_the_gateway_promptly_and_cancels_its_streams(faulty, tmp_path):
    """`cosine up` supervises `python -m cosine.gateway`: it must stop within seconds, even
    with a stream open, and leave nothing running in serve."""
    cluster, cfg, _ = faulty
    mine = tmp_path / "config.toml"
    text = cfg.read_text()
    port = free_port()
    mine.write_text(text[:text.index("\n[http]")])
    add_http(mine, port)
    proc = subprocess.Popen([sys.executable, "-m", "cosine.gateway", "--config", str(mine)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_line(proc, "READY cosine-http", 60)
        got: list[str] = []

        def stream() -> None:
            try:
                with httpx.stream("POST", f"http://127.0.0.1:{port}/v1/completions", timeout=60,
                                  headers={"Authorization": f"Bearer {API_KEYS[0]}"},
                                  json={"prompt": PROMPT, "max_tokens": 250, "stream": True, "ignore_eos": True}) as r:
                    for line in r.iter_lines():
                        got.append(line)
            except httpx.HTTPError:
                pass

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        end = time.monotonic() + 30
        while not got and time.monotonic() < end:
            time.sleep(0.02)
        assert got, "the stream never started"
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(15) == 0
        assert time.monotonic() - t0 < 8
        t.join(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    _released(cluster.endpoint)


def test_stalled_serve_is_504_then_recovers(faulty):
    cluster, _, base = faulty
    sdk = _sdk(base)
    os.kill(cluster.serve.proc.pid, signal.SIGSTOP)
    try:
        with pytest.raises(openai.InternalServerError, match="did not answer within 4.5 s") as e:
            sdk.completions.create(model="target", prompt=PROMPT, max_tokens=4)
        assert e.value.status_code == 504
    finally:
        os.kill(cluster.serve.proc.pid, signal.SIGCONT)
    _released(cluster.endpoint)
    assert sdk.completions.create(model="target", prompt=PROMPT, max_tokens=4).usage.completion_tokens >= 1


def test_dead_verifier_is_503(faulty):
    """Last in the module: it kills the verifier (for good: LocalCluster does not restart it),
    so the request is parked, no verifier takes it within verifier_grace_s, and it fails."""
    cluster, _, base = faulty
    sdk = _sdk(base)
    cluster.kill_worker("verifier-0")
    with pytest.raises(openai.InternalServerError, match="unavailable") as e:
        sdk.completions.create(model="target", prompt=PROMPT, max_tokens=4)
    assert e.value.status_code == 503
    h = httpx.get(base + "/health", timeout=60)
    assert h.status_code == 503 and h.json()["workers"]["verifier-0"]["state"] == "down"
