"""Client library against a live server: streaming, cancel, stats, typed errors, bad input."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import zmq

from cosine.client import (AsyncClient, BadRequest, Cancelled, Client, TooLong, UnknownRequest)
from cosine.protocol import VERSION, decode, encode

PROMPT = [5, 17, 12, 8, 9]


def test_stream_chunks_concatenate_to_text(control_cluster):
    with Client(control_cluster.endpoint, timeout_s=60) as c:
        s = c.generate(PROMPT, max_tokens=20, mode="cosine", stream=True)
        chunks = list(s)
        ref = c.generate(PROMPT, max_tokens=20, mode="autoregressive")
    assert s.result is not None
    assert "".join(ch.text for ch in chunks) == s.result.text
    assert [t for ch in chunks for t in ch.token_ids] == s.result.token_ids == ref.token_ids
    if len(ref.token_ids) >= 10:
        assert len(chunks) >= 2


def test_stop_string(control_cluster):
    with Client(control_cluster.endpoint, timeout_s=60) as c:
        full = c.generate(PROMPT, max_tokens=30, mode="autoregressive")
        if len(full.text) < 6:
            pytest.skip("tiny model produced too little text")
        stop = full.text[3:6]
        for mode in ("autoregressive", "cosine"):
            r = c.generate(PROMPT, max_tokens=30, mode=mode, stop=[stop])
            assert r.finish_reason == "stop"
            assert r.text == full.text[:full.text.find(stop)]


def test_cancel_stops_long_generation(control_cluster):
    with Client(control_cluster.endpoint, timeout_s=60) as c:
        s = c.generate(PROMPT, max_tokens=250, mode="autoregressive", stream=True, rid="long-one")
        it = iter(s)
        next(it)
        with Client(control_cluster.endpoint, timeout_s=10) as c2:
            with pytest.raises(UnknownRequest):
                c2.cancel("long-one")
        c.cancel("long-one")
        with pytest.raises(Cancelled):
            for _ in it:
                pass
        with pytest.raises(UnknownRequest):
            c.cancel("long-one")


def test_bad_inputs_typed_errors_and_good_request_unaffected(control_cluster):
    ep = control_cluster.endpoint
    with Client(ep, timeout_s=60) as ref_c:
        ref = ref_c.generate(PROMPT, max_tokens=40, mode="autoregressive").token_ids
    result: dict = {}

    def good() -> None:
        with Client(ep, timeout_s=60) as c:
            result["r"] = c.generate(PROMPT, max_tokens=40, mode="cosine")

    t = threading.Thread(target=good)
    t.start()
    with Client(ep, timeout_s=30) as c:
        with pytest.raises(BadRequest, match="unknown mode"):
            c.generate(PROMPT, mode="warp-speed")
        with pytest.raises(BadRequest, match="max_tokens"):
            c.generate(PROMPT, max_tokens=-3)
        with pytest.raises(BadRequest, match="max_tokens"):
            c.generate(PROMPT, max_tokens=0)
        with pytest.raises(BadRequest, match="over the server limit"):
            c.generate(PROMPT, max_tokens=10 ** 6)
        with pytest.raises(BadRequest, match="empty prompt"):
            c.generate([], max_tokens=4)
        with pytest.raises(BadRequest, match="empty prompt"):
            c.generate("", max_tokens=4)
        with pytest.raises(TooLong):
            c.generate([7] * 500, max_tokens=4)
        with pytest.raises(BadRequest, match="temperature"):
            c.generate(PROMPT, temperature="hot")  # type: ignore[arg-type]
        with pytest.raises(BadRequest, match="token ids"):
            c.generate([10 ** 6], max_tokens=4)
        with pytest.raises(UnknownRequest):
            c.cancel("no-such-request")
        assert c.health()["status"] == "ok"
    # malformed frames straight on the socket
    ctx = zmq.Context.instance()
    s = ctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(ep)
    try:
        for frames, code in (([b"\xc1garbage"], "bad_frame"),
                             (encode({"v": VERSION, "op": "generate", "seq": 1, "prompt": "x"}) + [b"extra"], "bad_frame"),
                             (encode({"v": 99, "op": "health", "seq": 2}), "version"),
                             (encode({"v": VERSION, "op": "launch", "seq": 3}), "unknown_op"),
                             (encode({"v": VERSION, "op": "generate", "seq": 4, "prompt": "x", "bogus": 1}), "bad_request")):
            s.send_multipart(frames)
            assert s.poll(10_000)
            h, _ = decode(s.recv_multipart())
            assert h["ok"] is False and h["error"]["code"] == code, h
            assert h["error"]["message"]
    finally:
        s.close(0)
    t.join(60)
    assert result["r"].token_ids == ref


def test_async_client_concurrent(control_cluster):
    async def main():
        async with AsyncClient(control_cluster.endpoint, timeout_s=60) as c:
            ref = await c.generate(PROMPT, max_tokens=16, mode="autoregressive")
            rs = await asyncio.gather(*[c.generate(PROMPT, max_tokens=16, mode=m)
                                        for m in ("cosine", "specinfer", "speculative", "cosine")])
            s = await c.generate(PROMPT, max_tokens=16, mode="cosine", stream=True)
            texts = [ch.text async for ch in s]
            h = await c.health()
            return ref, rs, texts, s.result, h

    ref, rs, texts, final, h = asyncio.run(main())
    assert all(r.token_ids == ref.token_ids for r in rs)
    assert "".join(texts) == final.text == ref.text
    assert h["status"] == "ok"


def test_ignore_eos_runs_to_max_tokens(control_cluster) -> None:
    """Benchmarks ask for exactly max_tokens; the eos token is then ordinary output.
    The tiny target (llama seed 0) greedily emits eos (id 0) 25 tokens after [7, 8, 9, 10]."""
    cluster = control_cluster
    with Client(cluster.endpoint, timeout_s=60) as c:
        stopped = c.generate([7, 8, 9, 10], max_tokens=40, mode="autoregressive")
        assert stopped.finish_reason == "eos" and len(stopped.token_ids) < 40
        r = c.generate([7, 8, 9, 10], max_tokens=40, mode="autoregressive", ignore_eos=True)
        assert len(r.token_ids) == 40 and r.finish_reason == "length"
        assert r.token_ids[:len(stopped.token_ids)] == stopped.token_ids and 0 in r.token_ids
        assert c.generate([7, 8, 9, 10], max_tokens=40, mode="cosine", ignore_eos=True).token_ids == r.token_ids
        with pytest.raises(BadRequest, match="ignore_eos must be a boolean"):
            c._call({"op": "generate", "rid": "x", "prompt": "a", "max_tokens": 2, "ignore_eos": "yes"})
