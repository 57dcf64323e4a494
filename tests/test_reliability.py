"""Faults on the serving path, with real processes and sockets on tiny models:

- cosine-serve killed (SIGKILL) or stopped (SIGTERM) mid-generation: clients get a typed
  Unavailable / ConnectionLost at once, the orphaned caches are freed when serve restarts
  (start-up `release all`), and resubmitted requests give identical greedy output;
- a stalled serve (SIGSTOP) is detected by heartbeats, and the client timeout is bounded;
- overload: more requests than the verifier's KV budget holds queue (admission control)
  or get a typed Overloaded; none is lost, outputs are identical to solo runs;
- request_timeout_s: a clear `timeout` error and the request's caches are released;
- fuzz of serve's ROUTER with random and mutated frames while a normal client runs.

Every request is accounted for: completed with the right output or a typed error.
"""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import numpy as np
import pytest
import zmq

from cosine.client import (AsyncClient, BadRequest, Client, ConnectionLost, CosineError, Overloaded, RequestTimeout,
                           Unavailable)
from cosine.control.cluster import LocalCluster, _Child
from cosine.protocol import decode, encode
from cosine.workers.client import WorkerClient

from conftest import write_cluster_config

PROMPTS = [[5, 17, 12, 8, 9], [3, 9, 27], [20, 21, 22, 7, 7, 7, 7, 1, 14]]


def make_config(control_engines: dict[str, Path], tmp_path: Path, controller: dict[str, Any] | None = None,
                limits: dict[str, Any] | None = None, verifier: dict[str, Any] | None = None) -> Path:
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               controller={"worker_timeout_s": 5.0, **(controller or {})}, limits=limits)
    if verifier:  # per-worker keys for verifier-0 only
        text = cfg.read_text()
        extra = "".join(f"\n{k} = {v!r}" for k, v in verifier.items())
        text = text.replace('name = "verifier-0"', 'name = "verifier-0"' + extra, 1)
        cfg.write_text(text)
    return cfg


def held(cluster: LocalCluster) -> dict[str, int]:
    """requests_held of every worker, asked directly (not through serve)."""
    out = {}
    for w in cluster.cfg.workers:
        with WorkerClient(w.endpoint, timeout_s=10) as c:
            out[w.name] = c.call("stats")[0]["requests_held"]
    return out


def wait_released(cluster: LocalCluster, timeout_s: float = 10.0) -> dict[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        h = held(cluster)
        if not any(h.values()) or time.monotonic() > deadline:
            return h
        time.sleep(0.1)


def restart_serve(cluster: LocalCluster) -> None:
    assert cluster.serve is not None and cluster.serve.proc.poll() is not None
    cmd = [sys.executable, "-m", "cosine.control.serve", "--config", str(cluster.config_path)]
    cluster.serve = _Child("serve", cmd, False)
    cluster.serve.wait_ready(time.monotonic() + 60)


# ----- a. serve killed / stopped mid-generation, restarted on the same endpoint ----------------

@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["kill9", "sigterm"])
def test_serve_dies_mid_generation_then_restarts(control_engines, tmp_path, sig):
    cfg = make_config(control_engines, tmp_path)
    with LocalCluster(cfg) as c:
        with Client(c.endpoint, timeout_s=30) as cl:
            refs = [cl.generate(p, max_tokens=150, mode="cosine").token_ids for p in PROMPTS]
            session = cl.health()["session"]
        clients = [Client(c.endpoint, timeout_s=30) for _ in PROMPTS]
        idle = Client(c.endpoint, timeout_s=30)
        idle.health()  # connected, then idle across the restart: must not see a stale failure
        loop = asyncio.new_event_loop()  # the same for the asyncio client (the HTTP gateway's)
        aidle = AsyncClient(c.endpoint, timeout_s=30)
        loop.run_until_complete(aidle.health())
        try:
            streams = [iter(cl.generate(p, max_tokens=150, mode="cosine", stream=True))
                       for cl, p in zip(clients, PROMPTS)]
            got = [list(next(it).token_ids) for it in streams]  # every request is running
            verifier = c.workers["verifier-0"].proc
            verifier.send_signal(signal.SIGSTOP)  # hold them mid-way, cached on the workers
            try:
                c.serve.proc.send_signal(sig)
                time.sleep(0.3)
            finally:
                verifier.send_signal(signal.SIGCONT)
            t0 = time.monotonic()
            errors = []
            for it, g in zip(streams, got):
                with pytest.raises(Unavailable) as e:
                    for ch in it:
                        g += ch.token_ids
                errors.append(e.value)
            assert time.monotonic() - t0 < 10, "clients were not told promptly"
            for e, g, ref in zip(errors, got, refs):
                assert g == ref[:len(g)]  # what was streamed before the failure was right
                if sig == signal.SIGKILL:
                    assert isinstance(e, ConnectionLost) and "lost" in e.message and "resubmit" in e.message
                else:  # SIGTERM: serve fails the running requests itself before it exits
                    assert "shutting down" in e.message or isinstance(e, ConnectionLost), e
            assert c.serve.proc.wait(30) == (0 if sig == signal.SIGTERM else -signal.SIGKILL)

            before = held(c)
            if sig == signal.SIGKILL:  # nobody released them: orphans on the verifier
                assert before["verifier-0"] == len(PROMPTS), before
            else:  # a clean stop releases on the way out
                assert before == {"verifier-0": 0, "good": 0, "poor": 0}, before
            restart_serve(c)
            assert held(c) == {"verifier-0": 0, "good": 0, "poor": 0}  # freed at start-up, not after idling
            for cl, p, ref in zip(clients, PROMPTS, refs):  # same clients, same endpoint
                assert cl.generate(p, max_tokens=150, mode="cosine").token_ids == ref
            assert idle.generate(PROMPTS[0], max_tokens=150, mode="cosine").token_ids == refs[0]
            got_async = loop.run_until_complete(aidle.generate(PROMPTS[0], max_tokens=150, mode="cosine"))
            assert got_async.token_ids == refs[0]
            assert idle.health()["session"] != session
            assert wait_released(c) == {"verifier-0": 0, "good": 0, "poor": 0}
        finally:
            for cl in clients + [idle]:
                cl.close()
            aidle.close()
            loop.close()


def test_stalled_serve_heartbeat_and_bounded_client_timeout(control_engines, tmp_path):
    cfg = make_config(control_engines, tmp_path)
    with LocalCluster(cfg) as c:
        with Client(c.endpoint, timeout_s=30) as cl:
            ref = cl.generate(PROMPTS[0], max_tokens=150, mode="cosine").token_ids
        serve = c.serve.proc
        # heartbeats: a stopped server is noticed long before the 60 s timeout
        with Client(c.endpoint, timeout_s=60, heartbeat_s=0.5) as hb, \
                Client(c.endpoint, timeout_s=1.5, heartbeat_s=None) as plain:
            hb.health()
            plain.health()
            s = iter(hb.generate(PROMPTS[0], max_tokens=150, mode="cosine", stream=True))
            next(s)
            serve.send_signal(signal.SIGSTOP)
            try:
                t0 = time.monotonic()
                with pytest.raises(ConnectionLost, match="stopped answering heartbeats"):
                    for _ in s:
                        pass
                assert time.monotonic() - t0 < 6
                t0 = time.monotonic()  # without heartbeats: the client timeout, with a clear message
                with pytest.raises(RequestTimeout, match=r"did not answer within 1.5 s \(client timeout_s\)"):
                    plain.generate(PROMPTS[1], max_tokens=8)
                assert time.monotonic() - t0 < 3
            finally:
                serve.send_signal(signal.SIGCONT)
            # the server comes back: both clients carry on, outputs unchanged
            assert hb.generate(PROMPTS[0], max_tokens=150, mode="cosine").token_ids == ref
            assert plain.generate(PROMPTS[0], max_tokens=150, mode="cosine", timeout_s=30).token_ids == ref
        assert wait_released(c) == {"verifier-0": 0, "good": 0, "poor": 0}


# ----- b. overload: more requests than the KV budget holds -------------------------------------

def test_overload_queues_or_rejects_and_loses_nothing(control_engines, tmp_path):
    # worst case per request: prompt + 60 output + 16 tree nodes <= 90 tokens; budget 200
    # holds two at a time. max_pending_requests bounds running + queued.
    cfg = make_config(control_engines, tmp_path, controller={"max_pending_requests": 8},
                      limits={"max_tree_nodes": 16}, verifier={"kv_budget_tokens": 200})
    n = 16
    with LocalCluster(cfg) as c:
        with Client(c.endpoint, timeout_s=60) as cl:
            solo = {i: cl.generate(PROMPTS[i % 3], max_tokens=60, mode="cosine", ignore_eos=True).token_ids
                    for i in range(3)}
        barrier = threading.Barrier(n)
        outcomes: list[Any] = [None] * n

        def one(i: int) -> None:
            with Client(c.endpoint, timeout_s=60) as cl:
                barrier.wait()
                try:
                    outcomes[i] = cl.generate(PROMPTS[i % 3], max_tokens=60, mode="cosine", ignore_eos=True)
                except CosineError as e:
                    outcomes[i] = e
                except Exception as e:  # noqa: BLE001 - an untyped error is a failure below
                    outcomes[i] = ("untyped", repr(e))

        threads = [threading.Thread(target=one, args=(i,)) for i in range(n)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert all(o is not None for o in outcomes), "a request never finished"
        done = [i for i, o in enumerate(outcomes) if not isinstance(o, (CosineError, tuple))]
        rejected = [o for o in outcomes if isinstance(o, CosineError)]
        assert all(isinstance(o, Overloaded) for o in rejected), rejected  # the only acceptable error
        assert not [o for o in outcomes if isinstance(o, tuple)]
        for i in done:
            assert outcomes[i].token_ids == solo[i % 3], i
        assert len(done) + len(rejected) == n
        assert len(done) >= 8 - 2 and rejected, (len(done), len(rejected))  # both paths were taken
        assert all("max_pending_requests" in e.message for e in rejected)
        with Client(c.endpoint, timeout_s=60) as cl:
            st = cl.stats()
            assert st["queue_waits"] >= 1  # some waited for KV room instead of failing
            assert st["verifiers"]["verifier-0"]["kv_reserved"] == 0
            assert cl.generate(PROMPTS[0], max_tokens=60, mode="cosine", ignore_eos=True).token_ids == solo[0]
        assert c.dead_child() is None
        assert wait_released(c) == {"verifier-0": 0, "good": 0, "poor": 0}
        print(f"overload: {len(done)} completed, {len(rejected)} overloaded, queue_waits {st['queue_waits']}")


# ----- c. request_timeout_s -----------------------------------------------------------------------

def test_request_timeout_releases_caches(control_engines, tmp_path):
    cfg = make_config(control_engines, tmp_path, controller={"request_timeout_s": 1.0, "worker_timeout_s": 10.0})
    with LocalCluster(cfg) as c:
        with Client(c.endpoint, timeout_s=30) as cl:
            ref = cl.generate(PROMPTS[0], max_tokens=40, mode="cosine").token_ids  # well under a second
            it = iter(cl.generate(PROMPTS[1], max_tokens=200, mode="cosine", stream=True))
            next(it)
            verifier = c.workers["verifier-0"].proc
            verifier.send_signal(signal.SIGSTOP)  # the request cannot finish in time
            time.sleep(1.3)
            verifier.send_signal(signal.SIGCONT)
            with pytest.raises(RequestTimeout, match="request_timeout_s = 1.0 s") as e:
                for _ in it:
                    pass
            assert e.value.code == "timeout" and "released" in e.value.message
            assert wait_released(c) == {"verifier-0": 0, "good": 0, "poor": 0}
            # client-side timeout: the client cancels, the server releases
            with Client(c.endpoint, timeout_s=0.3) as impatient:
                verifier.send_signal(signal.SIGSTOP)
                try:
                    with pytest.raises(RequestTimeout, match="client timeout_s"):
                        impatient.generate(PROMPTS[2], max_tokens=200, mode="cosine")
                finally:
                    verifier.send_signal(signal.SIGCONT)
            assert wait_released(c) == {"verifier-0": 0, "good": 0, "poor": 0}
            assert cl.generate(PROMPTS[0], max_tokens=40, mode="cosine").token_ids == ref
            st = cl.stats()
            assert st["requests_failed"] >= 1


# ----- d. fuzzing serve's ROUTER --------------------------------------------------------------------

MAX_MSG = 256 * 1024
GEN_FIELDS = {"rid": "r", "prompt": "hello", "max_tokens": 4, "temperature": 0.0, "top_p": 1.0, "stop": ["x"],
              "mode": "cosine", "stream": False, "seed": 1, "ignore_eos": False}
WEIRD = [None, -1, 0, 1, 2 ** 40, -2 ** 63, 2 ** 64 - 1, 1.5, float("nan"), float("inf"), "", "x" * 300, [], [0],
         ["a"] * 20, {}, {"a": 1}, True, b"\x00\xff", "cosine", "greedy", 10 ** 6, -0.0, [[[]]], 5e-324, 1e-300,
         9.1e-322, 1e-5]


def fuzz_messages(rng: random.Random, n: int, vocab: int) -> list[tuple[str, list[bytes]]]:
    """(kind, frames) messages: random bytes, mutated generate/cancel/health/stats."""

    def base() -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        op = rng.choice(["generate"] * 6 + ["cancel", "health", "stats", "nope", "", "GENERATE"])
        h: dict[str, Any] = {"v": 1, "op": op}
        arrays: dict[str, np.ndarray] = {}
        if op == "generate":
            h.update({k: v for k, v in GEN_FIELDS.items() if rng.random() < 0.6})
            h["rid"] = f"fz{rng.randrange(10 ** 9)}"
            h["max_tokens"] = rng.randint(1, 6)
            if rng.random() < 0.4:
                h.pop("prompt", None)
                arrays["tokens"] = np.array([rng.randrange(vocab) for _ in range(rng.randint(1, 8))], np.int32)
            elif "prompt" not in h:
                h["prompt"] = "".join(rng.choice("abc xyz\n\u00e9\u4e2d") for _ in range(rng.randint(0, 12)))
        elif op == "cancel":
            h["rid"] = rng.choice(["fz1", "nobody", 7, None])
        return h, arrays

    out = []
    for _ in range(n):
        h, arrays = base()
        kind = rng.choice(["valid", "field", "field", "header", "array", "shape", "flip", "truncate", "frames",
                           "random", "bytes_key", "version", "oversized"])
        if kind == "field" and h["op"] == "generate":
            h[rng.choice(list(GEN_FIELDS) + ["tokens", "extra", "arrays"])] = rng.choice(WEIRD)
        elif kind == "header":
            h[rng.choice(["v", "op", "seq", "arrays"])] = rng.choice(WEIRD)
        elif kind == "array" and h["op"] == "generate":
            a = np.arange(rng.randint(0, 6))
            arrays["tokens"] = rng.choice([a.astype(np.float32), a.astype(np.int8), a.reshape(1, -1).astype(np.int32),
                                           np.array([vocab, -1], np.int32), np.array(5, np.int64),
                                           np.array([2 ** 40], np.int64), a.astype(np.bool_)])
            if rng.random() < 0.3:
                arrays["extra"] = np.zeros(3, np.float32)
        elif kind == "version":
            h["v"] = rng.choice([0, 2, "1", 1.0, None, -1])
        elif kind == "bytes_key":
            h[rng.choice([b"op", b"zzz", b"v"])] = 1
        if kind not in ("header",) or "seq" not in h:
            h.setdefault("seq", 0)
        try:
            frames = encode(h, arrays)
        except (ValueError, TypeError, OverflowError):
            frames = [msgpack.packb({"v": 1, "op": "health", "seq": 0})]
        if kind == "shape":
            hh = msgpack.unpackb(frames[0], raw=False)
            dims = rng.choice([[2 ** 32, 2 ** 32], [2 ** 62, 4], [0, 2 ** 63], [10 ** 9], [-1], [1.5], "x",
                               [2 ** 31 - 1] * 3 + [0], [1] * 9, None])
            hh["arrays"] = [{"name": "tokens", "dtype": rng.choice(["int32", "int64", "object", "<i4", 5]),
                             "shape": dims}]
            frames = [msgpack.packb(hh), rng.choice([b"", b"\x00" * 8])]
        elif kind == "flip":
            b = bytearray(frames[0])
            for _ in range(rng.randint(1, 4)):
                b[rng.randrange(len(b))] = rng.randrange(256)
            frames[0] = bytes(b)
        elif kind == "truncate":
            frames[0] = frames[0][:rng.randrange(len(frames[0]))]
        elif kind == "frames":
            frames = frames[:-1] if len(frames) > 1 and rng.random() < 0.5 else [*frames, os.urandom(rng.randint(0, 9))]
        elif kind == "random":
            frames = [os.urandom(rng.randint(0, 64)) for _ in range(rng.randint(1, 3))]
        elif kind == "oversized":
            frames = [frames[0], os.urandom(MAX_MSG + 1024)]
        out.append((kind, [bytes(f) for f in frames]))
    return out


def _with_seq(frames: list[bytes], seq: int) -> list[bytes]:
    try:
        h = msgpack.unpackb(frames[0], raw=False, strict_map_key=False)
    except Exception:  # noqa: BLE001 - not a map: leave as is
        return frames
    if isinstance(h, dict) and isinstance(h.get("seq"), int) and not isinstance(h.get("seq"), bool):
        h["seq"] = seq
        return [msgpack.packb(h, use_bin_type=True), *frames[1:]]
    return frames


def test_fuzz_serve_frontend(control_engines, tmp_path):
    n = int(os.environ.get("COSINE_FUZZ_N", "300"))
    cfg = make_config(control_engines, tmp_path, limits={"max_message_bytes": MAX_MSG})
    good_prompts = [(PROMPTS[0], "cosine"), (PROMPTS[1], "autoregressive"), ("hello world", "specinfer")]
    with LocalCluster(cfg) as c:
        with Client(c.endpoint, timeout_s=60) as cl:
            baseline = [cl.generate(p, max_tokens=24, mode=m).token_ids for p, m in good_prompts]
            vocab = cl.health()["vocab_size"]
        stop = threading.Event()
        good_runs: list[tuple[int, list[int]]] = []
        good_errors: list[str] = []

        def well_formed() -> None:  # a normal client, concurrently
            with Client(c.endpoint, timeout_s=60) as cl:
                k = 0
                while not stop.is_set():
                    p, m = good_prompts[k % 3]
                    try:
                        good_runs.append((k % 3, cl.generate(p, max_tokens=24, mode=m).token_ids))
                    except Exception as e:  # noqa: BLE001 - any failure of a good request fails the test
                        good_errors.append(repr(e))
                    k += 1

        bg = threading.Thread(target=well_formed)
        bg.start()
        ctx = zmq.Context.instance()
        rng = random.Random(int(os.environ.get("COSINE_FUZZ_SEED", "20261123")))
        codes: dict[str, int] = {}
        no_reply: list[tuple[str, list[bytes]]] = []
        t_start = time.monotonic()
        sock = ctx.socket(zmq.DEALER)
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(c.endpoint)
        try:
            for i, (kind, frames) in enumerate(fuzz_messages(rng, n, vocab), start=1):
                frames = _with_seq(frames, i)
                if kind == "oversized":  # over max_message_bytes: the connection is dropped, no reply
                    big = ctx.socket(zmq.DEALER)
                    big.setsockopt(zmq.LINGER, 0)
                    big.connect(c.endpoint)
                    big.send_multipart(frames)
                    assert not big.poll(200), "an oversized message got a reply"
                    big.close(0)
                    codes["oversized(dropped)"] = codes.get("oversized(dropped)", 0) + 1
                    continue
                sock.send_multipart(frames)
                final = None
                deadline = time.monotonic() + 15
                while final is None and time.monotonic() < deadline:
                    if not sock.poll(int((deadline - time.monotonic()) * 1000) + 1):
                        break
                    h, _ = decode(sock.recv_multipart())
                    if h.get("op") != "chunk":  # one message at a time: every reply is this one's
                        final = h
                if final is None:
                    no_reply.append((kind, frames))
                    continue
                key = "ok" if final.get("ok") else final["error"]["code"]
                codes[key] = codes.get(key, 0) + 1
                assert key != "internal", (kind, frames, final)
        finally:
            stop.set()
            bg.join(60)
            sock.close(0)
        elapsed = time.monotonic() - t_start
        print(f"fuzz: {n} messages in {elapsed:.1f} s; reply codes {dict(sorted(codes.items()))}; "
              f"{len(good_runs)} concurrent good requests")
        assert not no_reply, no_reply[:3]
        assert c.dead_child() is None
        with Client(c.endpoint, timeout_s=30) as cl:
            assert cl.health()["status"] == "ok"
            for (p, m), ref in zip(good_prompts, baseline):  # and after it
                assert cl.generate(p, max_tokens=24, mode=m).token_ids == ref
            # found by this fuzz: a denormal temperature overflowed logits / T and failed the
            # whole round (every running request) with `internal`
            with pytest.raises(BadRequest, match="too small"):
                cl.generate(PROMPTS[0], max_tokens=4, temperature=9.1e-322)
        assert not good_errors, good_errors[:3]
        assert good_runs and all(ids == baseline[j] for j, ids in good_runs)
        assert len(codes) >= 5, codes  # the fuzz reached many different checks
        assert wait_released(c) == {"verifier-0": 0, "good": 0, "poor": 0}


def test_worker_survives_overflowing_shape(control_engines, tmp_path):
    """A header whose shape product overflows int64 used to raise ValueError out of the
    decoder, which stopped a worker's I/O thread; now it is a bad_frame reply."""
    cfg = make_config(control_engines, tmp_path)
    with LocalCluster(cfg) as c:
        ep = c.cfg.worker("verifier-0").endpoint
        s = zmq.Context.instance().socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        s.connect(ep)
        try:
            for seq, shape in enumerate(([2 ** 32, 2 ** 32], [2 ** 31 - 1, 2 ** 31 - 1, 0], [0, 2 ** 63]), start=1):
                s.send_multipart([msgpack.packb({"v": 1, "op": "extend", "seq": seq, "requests": [],
                                                 "arrays": [{"name": "tokens", "dtype": "int32", "shape": shape}]}),
                                  b""])
                assert s.poll(5000), shape
                h, _ = decode(s.recv_multipart())
                assert h["ok"] is False and h["error"]["code"] == "bad_frame", h
        finally:
            s.close(0)
        with WorkerClient(ep, timeout_s=5) as w:
            assert w.call("health")[0]["name"] == "verifier-0"
        with Client(c.endpoint, timeout_s=30) as cl:
            assert cl.generate(PROMPTS[0], max_tokens=8).token_ids


def test_worker_release_all_keeps_prefix(worker_engines, worker_config):
    """The start-up sweep of serve: `release` with all=true frees everything but keep_prefix."""
    from cosine.workers.client import WorkerError, spawn_worker, stop_worker

    cfg = worker_config(worker_engines["llama"])
    proc = spawn_worker(cfg, "w0")
    try:
        import tomllib

        w = tomllib.loads(cfg.read_text())["workers"][0]
        with WorkerClient(f"tcp://{w['host']}:{w['port']}", timeout_s=10) as c:
            rids = ["old1.1", "old1.2", "new.1", "other"]
            c.call("prefill", {"requests": [{"rid": r, "n": 2} for r in rids]}, {"tokens": np.ones(8, np.int32)})
            for bad in ({"all": 1}, {"all": True, "keep_prefix": 3}, {"all": True, "rids": ["x"]},
                        {"rids": ["x"], "keep_prefix": "new."}):
                with pytest.raises(WorkerError) as e:
                    c.call("release", bad)
                assert e.value.code == "bad_request"
            h, _ = c.call("release", {"all": True, "keep_prefix": "new."})
            assert sorted(h["released"]) == ["old1.1", "old1.2", "other"] and h["unknown"] == []
            s, _ = c.call("stats")
            assert s["requests_held"] == 1
            h, _ = c.call("release", {"all": True})
            assert h["released"] == ["new.1"]
            assert c.call("stats")[0]["requests_held"] == 0
    finally:
        assert stop_worker(proc) == 0


def test_serve_killed_under_load(control_engines, tmp_path):
    """`cosine-bench load`'s clients while serve is killed with SIGKILL and restarted: every
    request completes or fails with ConnectionLost; none is lost, greedy outputs stay right."""
    from cosine.bench.load import run_load

    cfg = make_config(control_engines, tmp_path)
    with LocalCluster(cfg) as c:
        out: dict[str, Any] = {}
        t = threading.Thread(target=lambda: out.update(run_load(c.endpoint, ["def fib(n):", "Es war einmal"], 4, 12.0,
                                                                max_tokens=24, timeout_s=60)))
        t.start()
        time.sleep(4)
        c.serve.proc.kill()
        c.serve.proc.wait()
        restart_serve(c)
        t.join(120)
        r = out["requests"]
        print("serve killed under load:", r)
        assert r["lost"] == 0 and r["clients_unfinished"] == 0, r
        assert set(r["errors"]) <= {"ConnectionLost(unavailable)"}, r["errors"]
        assert out["determinism"]["mismatches"] == 0
        assert r["completed"] > 0
        assert wait_released(c) == {"verifier-0": 0, "good": 0, "poor": 0}
