"""Clients fail fast when nobody is there: a client that has never reached its endpoint
raises `Unavailable` within connect_timeout_s (default 5 s), naming the endpoint and how to
start a server; `cosine generate` exits nonzero. A request given up on is never delivered
to a server that starts later. Once a client has reached its server, the heartbeat and
timeout rules apply as before (docs/reliability.md)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
import time

import pytest
import zmq

from cosine.client import AsyncClient, Client, ConnectionLost, RequestTimeout, Unavailable
from cosine.protocol import decode, encode, ok_reply

from conftest import free_port


def nobody() -> str:
    return f"tcp://127.0.0.1:{free_port()}"


def test_never_started_endpoint_fails_within_6_s(tmp_path):
    """Defaults: the library raises Unavailable after 5 s; `cosine generate` (run alongside)
    exits 1 with the same message."""
    ep = nobody()
    t_cli = time.monotonic()
    cli = subprocess.Popen([sys.executable, "-m", "cosine.cli", "generate", "hello", "--endpoint", ep],
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    t0 = time.monotonic()
    with Client(ep) as c, pytest.raises(Unavailable) as e:
        c.generate("hello", max_tokens=4)
    assert 4.9 < time.monotonic() - t0 < 6.0
    assert f"could not reach cosine-serve at {ep} within 5 s" in e.value.message
    assert "cosine up --config config.toml" in e.value.message
    _, err = cli.communicate(timeout=60)
    assert cli.returncode == 1, err
    assert time.monotonic() - t_cli < 6.0 + 1.5  # 5 s, plus the interpreter's start-up on a busy machine
    assert f"cosine generate: unavailable: could not reach cosine-serve at {ep} within 5 s" in err


def test_client_raises_unavailable_within_connect_timeout():
    ep = nobody()
    with Client(ep, timeout_s=600, connect_timeout_s=1.0) as c:
        for call in (lambda: c.health(), lambda: c.generate("hi", max_tokens=4),
                     lambda: list(c.generate("hi", max_tokens=4, stream=True))):
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match=f"could not reach cosine-serve at {ep} within 1 s") as e:
                call()
            assert 0.9 < time.monotonic() - t0 < 3.0
            assert e.value.code == "unavailable" and not isinstance(e.value, ConnectionLost)


def test_async_client_fails_every_waiting_request():
    ep = nobody()

    async def run() -> list[BaseException]:
        async with AsyncClient(ep, timeout_s=600, connect_timeout_s=1.0) as c:
            t0 = time.monotonic()
            out = await asyncio.gather(c.generate("a", max_tokens=4), c.health(), c.stats(), return_exceptions=True)
            assert time.monotonic() - t0 < 3.0
            return out

    for e in asyncio.run(run()):
        assert isinstance(e, Unavailable) and ep in e.message, e


def _serve_one(router: zmq.Socket) -> dict:
    """Answer one request on a bare ROUTER (a stand-in peer that records what arrives)."""
    assert router.poll(10_000), "nothing arrived"
    ident, *frames = router.recv_multipart()
    h, _ = decode(frames)
    router.send_multipart([ident, *encode(ok_reply(h, status="ok"), {})])
    return h


def test_a_request_given_up_on_never_reaches_a_later_server_and_reach_is_remembered():
    ep = nobody()
    ctx = zmq.Context.instance()
    with Client(ep, timeout_s=1.5, connect_timeout_s=0.5) as c:
        with pytest.raises(Unavailable):
            c.generate("never sent", max_tokens=4, rid="stale")
        router = ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        router.bind(ep)
        got: list[dict] = []
        peer = threading.Thread(target=lambda: got.append(_serve_one(router)))
        peer.start()
        try:
            assert c.health()["status"] == "ok"
        finally:
            peer.join(10)
            router.close(0)
        assert got and got[0]["op"] == "health", got  # the first to arrive: not the abandoned generate
        # it reached its endpoint once: with the server gone, a request is lost if the
        # disconnect is seen while it is in flight, else it waits up to timeout_s; it never
        # fails as "could not reach" after connect_timeout_s
        t0 = time.monotonic()
        with pytest.raises((RequestTimeout, ConnectionLost)) as e:
            c.health()
        assert isinstance(e.value, ConnectionLost) or time.monotonic() - t0 >= 1.4
        assert "could not reach" not in e.value.message
