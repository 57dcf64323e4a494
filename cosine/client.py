"""Client library for a running cosine server (`cosine-serve` / `cosine up`).

    from cosine.client import Client
    with Client("tcp://127.0.0.1:5600") as c:
        r = c.generate("def fib(n):", max_tokens=64)
        print(r.text, r.stats["mean_accepted_length"])
        for chunk in c.generate("Once upon", stream=True):
            print(chunk.text, end="", flush=True)

One ZeroMQ DEALER socket per client. ZeroMQ sockets are not thread-safe: use a Client
from one thread only (give each thread its own Client; they are cheap). `AsyncClient`
is the asyncio flavour with the same methods as coroutines; it may run many generations
concurrently on one event loop.

A server with `[security] curve = true` answers only CURVE clients whose public key it
lists (docs/security.md): ``Client(endpoint, curve=CurveKeys.load(client_secret_key,
server_public_key))``, or ``CurveKeys.from_config(cfg.security)``.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import sys
import time
import uuid
from collections import deque
from pathlib import Path
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Sequence

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from cosine.config import MODES
from cosine.protocol import VERSION, ProtocolError, decode, encode
from cosine.security import CLIENT_EVENTS, CurveKeys, Refusal, client_refusal, secure_client


class CosineError(Exception):
    """Base of every error the server reports; ``code`` is the protocol error code."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class BadRequest(CosineError):
    """The request was rejected as invalid (bad field, unknown mode, too long, ...)."""


class TooLong(BadRequest):
    """Prompt (or prompt + output) over the server's limits or the model's context."""


class Overloaded(CosineError):
    """The server's request pool or KV budget is full; retry later."""


class Unavailable(CosineError):
    """A worker the request needs is down or did not answer in time."""


class ConnectionLost(Unavailable):
    """The connection to cosine-serve broke (it exited, was killed, or stopped answering
    heartbeats) while the request was in flight. The request is lost: a restarted server
    holds no state of it. Resubmitting it is safe (greedy output is deterministic)."""


class Refused(CosineError):
    """The server refused the connection's security handshake (CurveZMQ: no keys, or a key
    it does not list); retrying with the same keys cannot succeed. docs/security.md"""


class RequestTimeout(CosineError, TimeoutError):
    """No reply within the timeout (client side) or the server's request timeout."""


class UnknownRequest(CosineError):
    """``cancel`` of a request id the server does not hold."""


class Cancelled(CosineError):
    """The generation was cancelled (by ``cancel``) before it finished."""


_ERRORS: dict[str, type[CosineError]] = {
    "bad_request": BadRequest, "bad_frame": BadRequest, "unknown_op": BadRequest,
    "version": BadRequest, "duplicate_request": BadRequest, "duplicate_seq": BadRequest,
    "too_long": TooLong, "overloaded": Overloaded, "capacity": Overloaded,
    "unavailable": Unavailable, "timeout": RequestTimeout, "unknown_request": UnknownRequest,
    "cancelled": Cancelled, "unauthorized": Refused,
}


_STREAM_OPS = ("generate", "chunk", "done")  # replies that belong to a generation (by rid)

# Heartbeats (ZMTP PING/PONG, answered by the server's ZeroMQ I/O thread) detect a server
# that is stopped or unreachable; a closed connection (exit, kill -9) is seen at once.
HEARTBEAT_S = 2.0
# A client that has never completed a handshake with its endpoint gives a request this long
# before it says that nobody is there (instead of waiting the whole timeout_s).
CONNECT_TIMEOUT_S = 5.0


def _watch(sock: zmq.Socket, heartbeat_s: float | None) -> zmq.Socket:
    """Set heartbeats (before connect) and return a monitor socket for handshakes and disconnects."""
    if heartbeat_s:
        sock.setsockopt(zmq.HEARTBEAT_IVL, max(1, int(heartbeat_s * 1000)))
        sock.setsockopt(zmq.HEARTBEAT_TIMEOUT, max(1, int(3 * heartbeat_s * 1000)))
    # a unique address: the default one is derived from the fd, which a closed socket frees
    return sock.get_monitor_socket(zmq.EVENT_DISCONNECTED | zmq.EVENT_HANDSHAKE_SUCCEEDED | CLIENT_EVENTS,
                                   addr=f"inproc://cosine-client-monitor-{uuid.uuid4().hex}")


class _Link:
    """Whether a client ever reached its endpoint, and since when it has waited to."""

    def __init__(self, endpoint: str, connect_timeout_s: float | None):
        self.endpoint, self.connect_timeout_s = endpoint, connect_timeout_s
        self.reached = False
        self.waiting_since: float | None = None  # first request sent while not reached

    def sent(self) -> None:
        if not self.reached and self.waiting_since is None:
            self.waiting_since = time.monotonic()

    def deadline(self) -> float | None:
        """When to give up on a never-reached endpoint (None: reached, or no limit)."""
        if self.reached or not self.connect_timeout_s or self.waiting_since is None:
            return None
        return self.waiting_since + self.connect_timeout_s

    def expired(self) -> bool:
        d = self.deadline()
        return d is not None and time.monotonic() >= d

    def marker(self, why: Refusal | None) -> dict[str, Any]:
        """What every waiting request gets when the endpoint was never reached in time."""
        self.waiting_since = None
        return {"ok": False, "_unreached": True, "why": why.message if why else ""}

    def error(self, why: str) -> Unavailable:
        msg = (f"could not reach cosine-serve at {self.endpoint} within {self.connect_timeout_s:g} s "
               f"(connect_timeout_s; `cosine generate --connect-timeout`): no server answers there. Start one "
               f"with `cosine up --config config.toml` (or `cosine-serve`), or point the client at a running "
               f"server (`cosine generate --endpoint tcp://HOST:PORT` or `--config`)")
        return Unavailable("unavailable", msg + (f"; the last handshake failed: {why}" if why else ""))


def _link_events(mon: zmq.Socket, link: _Link, why: Refusal | None, secure: bool) -> tuple[bool, Refusal | None]:
    """Read the monitor events queued so far: (a disconnect among them?, the handshake
    refusal seen, else ``why``); marks ``link`` reached on a handshake."""
    lost = False
    while mon.poll(0):
        ev = parse_monitor_message(mon.recv_multipart())
        lost |= ev["event"] == zmq.EVENT_DISCONNECTED
        link.reached |= ev["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED
        why = client_refusal(ev["event"], ev["value"], secure) or why
    return lost, why


def _lost_marker(refused: Refusal | None) -> dict[str, Any]:
    """What in-flight requests get when the link breaks: lost, or refused in the handshake."""
    return {"ok": False, "error": {"code": "unauthorized", "message": refused.message}} if refused else \
        {"ok": False, "_lost": True}


def _lost_error(endpoint: str) -> ConnectionLost:
    return ConnectionLost("unavailable", f"connection to cosine-serve at {endpoint} was lost while the request was "
                                         f"in flight (the server exited, was restarted or stopped answering "
                                         f"heartbeats); the request is lost, resubmit it")


def _timeout_error(endpoint: str, timeout_s: float) -> RequestTimeout:
    return RequestTimeout("timeout", f"cosine-serve at {endpoint} did not answer within {timeout_s:g} s "
                                     f"(client timeout_s); it may be down, not started yet, stalled or overloaded")


def _raise_for(h: dict[str, Any], link: _Link) -> None:
    """Raise what a failed reply (or a lost / unreached marker) means."""
    if h.get("_lost"):
        raise _lost_error(link.endpoint)
    if h.get("_unreached"):
        raise link.error(h.get("why", ""))
    if not h.get("ok", False):
        raise error_from(h.get("error"))


def error_from(err: Any) -> CosineError:
    if not isinstance(err, dict):
        return CosineError("internal", f"malformed error reply {err!r}")
    code, msg = str(err.get("code", "internal")), str(err.get("message", ""))
    return _ERRORS.get(code, CosineError)(code, msg)


@dataclass
class Chunk:
    text: str
    token_ids: list[int]


@dataclass
class GenerateResult:
    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict[str, Any] = field(default_factory=dict)
    rid: str = ""


def _generate_header(rid: str, prompt: str | Sequence[int], max_tokens: int, temperature: float, top_p: float,
                     stop: Sequence[str] | None, mode: str | None, stream: bool,
                     seed: int | None, ignore_eos: bool = False,
                     drafters: Sequence[str] | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    h: dict[str, Any] = {"op": "generate", "rid": rid, "max_tokens": max_tokens, "temperature": temperature,
                         "top_p": top_p, "stream": stream}
    if ignore_eos:  # benchmarks: generate exactly max_tokens
        h["ignore_eos"] = True
    if drafters:  # pin the request to these drafter workers
        h["drafters"] = list(drafters)
    arrays: dict[str, np.ndarray] = {}
    if isinstance(prompt, str):
        h["prompt"] = prompt
    else:
        arrays["tokens"] = np.asarray(list(prompt), dtype=np.int32)
    if stop:
        h["stop"] = [stop] if isinstance(stop, str) else list(stop)
    if mode is not None:
        h["mode"] = mode
    if seed is not None:
        h["seed"] = seed
    return h, arrays


def _done(h: dict[str, Any]) -> GenerateResult:
    return GenerateResult(text=h.get("text", ""), token_ids=list(h.get("token_ids", [])),
                          finish_reason=h.get("finish_reason", ""), stats=dict(h.get("stats", {})),
                          rid=h.get("rid", ""))


class Stream:
    """Iterator of Chunk; after it ends, ``result`` holds the GenerateResult."""

    def __init__(self, client: "Client", rid: str, timeout_s: float):
        self._client, self.rid, self._timeout = client, rid, timeout_s
        self.result: GenerateResult | None = None

    def __iter__(self) -> Iterator[Chunk]:
        while self.result is None:
            h = self._client._next_for(self.rid, self._timeout)
            if h.get("op") == "chunk":
                yield Chunk(h.get("text", ""), list(h.get("tokens", [])))
            else:
                self.result = _done(h)

    def cancel(self) -> None:
        self._client.cancel(self.rid)


class Client:
    """Blocking client. Not thread-safe: one Client per thread.

    ``connect_timeout_s``: while the client has never reached its endpoint, a request fails
    with ``Unavailable`` after this long (None: only ``timeout_s`` applies). Once reached,
    a broken connection fails the requests in flight with ``ConnectionLost`` (heartbeats)."""

    def __init__(self, endpoint: str, timeout_s: float = 600.0, context: zmq.Context | None = None,
                 heartbeat_s: float | None = HEARTBEAT_S, curve: CurveKeys | None = None,
                 connect_timeout_s: float | None = CONNECT_TIMEOUT_S):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._ctx = context or zmq.Context.instance()
        # the last failed handshake, and the one after which libzmq gave up (docs/security.md)
        self._curve, self._why, self._refused = curve, None, None
        self._heartbeat_s = heartbeat_s
        self._link = _Link(endpoint, connect_timeout_s)
        self._open()
        self._seq = itertools.count(1)
        self._by_rid: dict[str, deque[dict[str, Any]]] = {}
        self._by_seq: dict[int, dict[str, Any]] = {}
        self._calls: set[int] = set()  # seqs of calls waiting for their reply

    # -- plumbing --------------------------------------------------------------------
    def _open(self) -> None:
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        secure_client(self._sock, self._curve)  # server with [security] curve = true: CurveKeys.load(...)
        self._mon = _watch(self._sock, self._heartbeat_s)
        self._sock.connect(self.endpoint)
        self._poller = zmq.Poller()
        self._poller.register(self._sock, zmq.POLLIN)
        self._poller.register(self._mon, zmq.POLLIN)

    def _send(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None) -> int:
        seq = next(self._seq)
        self._sock.send_multipart(encode({"v": VERSION, **header, "seq": seq}, arrays or {}), copy=False)
        self._link.sent()
        return seq

    def _give_up(self) -> None:
        """Nobody answered at the endpoint in time: fail everything waiting, and start over
        on a new socket, so the queued requests can never reach a server that starts later."""
        marker = self._link.marker(self._why)
        self.close()
        self._why = None
        self._open()
        for q in self._by_rid.values():
            q.append(marker)
        for seq in self._calls:
            self._by_seq.setdefault(seq, marker)

    def _check_link(self) -> None:
        """Handle disconnects seen so far: everything in flight then is lost (a new
        connection gets a new identity at the server, so no reply can reach it)."""
        lost, self._why = _link_events(self._mon, self._link, self._why, self._curve is not None)
        self._refused = self._refused or (self._why if self._why and self._why.final else None)
        if not lost:
            if self._refused:  # libzmq does not reconnect after it: fail new requests at once
                raise Refused("unauthorized", self._refused.message)
            return
        while self._sock.poll(0):  # replies that made it before the connection broke still count
            self._dispatch()
        marker, self._why = _lost_marker(self._why), None
        for q in self._by_rid.values():
            q.append(marker)
        for seq in self._calls:
            self._by_seq.setdefault(seq, marker)

    def _recv_one(self, deadline: float, timeout_s: float | None = None) -> None:
        until = min(deadline, self._link.deadline() or deadline)
        wait_ms = max(0, math.ceil((until - time.monotonic()) * 1000))
        events = dict(self._poller.poll(wait_ms))
        if not events:
            if self._link.expired():
                self._give_up()
            elif time.monotonic() >= deadline:
                raise _timeout_error(self.endpoint, timeout_s or self.timeout_s)
            return  # the caller waits on
        if self._mon in events:
            self._check_link()
        elif self._sock in events:
            self._dispatch()

    def _dispatch(self) -> None:
        try:
            h, _ = decode(self._sock.recv_multipart())
        except ProtocolError as e:
            raise CosineError(e.code, e.message) from None
        rid = h.get("rid")
        if h.get("op") in _STREAM_OPS and isinstance(rid, str) and rid in self._by_rid:
            self._by_rid[rid].append(h)
        elif isinstance(h.get("seq"), int):
            self._by_seq[h["seq"]] = h
        # anything else is a reply to a request this client gave up on: drop it

    def _call(self, header: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        self._check_link()
        seq = self._send(header)
        deadline = time.monotonic() + (timeout_s or self.timeout_s)
        self._calls.add(seq)
        try:
            while seq not in self._by_seq:
                self._recv_one(deadline, timeout_s)
        finally:
            self._calls.discard(seq)
        h = self._by_seq.pop(seq)
        _raise_for(h, self._link)
        return h

    def _next_for(self, rid: str, timeout_s: float) -> dict[str, Any]:
        q = self._by_rid[rid]
        deadline = time.monotonic() + timeout_s
        try:
            while not q:
                self._recv_one(deadline, timeout_s)
        except RequestTimeout:
            self._by_rid.pop(rid, None)
            try:  # best effort: do not leave the generation running on the server
                self._send({"op": "cancel", "rid": rid})
            except zmq.ZMQError:
                pass
            raise
        h = q.popleft()
        if not h.get("ok", False) or h.get("op") == "done":
            self._by_rid.pop(rid, None)
        _raise_for(h, self._link)
        return h

    # -- API ---------------------------------------------------------------------------
    def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.0,
                 top_p: float = 1.0, stop: Sequence[str] | None = None, mode: str | None = None,
                 stream: bool = False, seed: int | None = None, timeout_s: float | None = None,
                 rid: str | None = None, ignore_eos: bool = False,
                 drafters: Sequence[str] | None = None) -> GenerateResult | Stream:
        """Generate a continuation. With ``stream=True`` returns a Stream of Chunk."""
        rid = rid or uuid.uuid4().hex
        h, arrays = _generate_header(rid, prompt, max_tokens, temperature, top_p, stop, mode, stream, seed, ignore_eos,
                                     drafters)
        self._check_link()  # a disconnect before this request must not fail it
        self._by_rid[rid] = deque()
        self._send(h, arrays)
        t = timeout_s or self.timeout_s
        s = Stream(self, rid, t)
        if stream:
            return s
        for _ in s:
            pass
        assert s.result is not None
        return s.result

    def cancel(self, rid: str) -> None:
        self._call({"op": "cancel", "rid": rid})

    def health(self) -> dict[str, Any]:
        return self._call({"op": "health"})

    def stats(self, timeline: int = 0) -> dict[str, Any]:
        """Server and worker statistics; ``timeline=N`` adds the last N rounds' phases."""
        return self._call({"op": "stats", **({"timeline": timeline} if timeline else {})})

    def close(self) -> None:
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(0)
        self._sock.close(0)

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class AsyncStream:
    def __init__(self, client: "AsyncClient", rid: str, timeout_s: float):
        self._client, self.rid, self._timeout = client, rid, timeout_s
        self.result: GenerateResult | None = None

    def __aiter__(self) -> AsyncIterator[Chunk]:
        return self._gen()

    def has_next(self) -> bool:
        """Whether the next reply is here already: a reader can put what is ready into one write."""
        q = self._client._waiters.get(("rid", self.rid))
        return q is not None and not q.empty()

    async def _gen(self) -> AsyncIterator[Chunk]:
        while self.result is None:
            h = await self._client._next_for(self.rid, self._timeout)
            if h.get("op") == "chunk":
                yield Chunk(h.get("text", ""), list(h.get("tokens", [])))
            else:
                self.result = _done(h)


_EVENTS, _POLLIN = int(zmq.EVENTS), int(zmq.POLLIN)  # plain ints: enum arithmetic costs per message


class AsyncClient:
    """asyncio client: one DEALER socket, many concurrent generations on one event loop.
    ``connect_timeout_s`` as for ``Client``.

    The event loop watches the socket's file descriptor and a callback hands each message to
    its waiter's queue, with no future per message: a streamed token costs the gateway (which
    forwards every one) a fraction of what zmq.asyncio's per-recv futures did."""

    def __init__(self, endpoint: str, timeout_s: float = 600.0, context: zmq.Context | None = None,
                 heartbeat_s: float | None = HEARTBEAT_S, curve: CurveKeys | None = None,
                 connect_timeout_s: float | None = CONNECT_TIMEOUT_S):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        # plain sockets, also on a zmq.asyncio context: reads happen in _drain, never awaited
        self._ctx = zmq.Context.shadow(context.underlying) if context is not None else zmq.Context.instance()
        self._curve, self._why, self._refused = curve, None, None
        self._heartbeat_s = heartbeat_s
        self._link = _Link(endpoint, connect_timeout_s)
        self._loop: asyncio.AbstractEventLoop | None = None  # the loop that watches the sockets
        self._open()
        self._seq = itertools.count(1)
        self._waiters: dict[Any, asyncio.Queue] = {}

    def _open(self) -> None:
        self._sock = self._ctx.socket(zmq.DEALER)
        self._sock.setsockopt(zmq.LINGER, 0)
        secure_client(self._sock, self._curve)
        self._mon = _watch(self._sock, self._heartbeat_s)
        self._sock.connect(self.endpoint)

    def _give_up(self) -> None:
        """As Client._give_up: fail every waiter, start over on a new socket."""
        marker = self._link.marker(self._why)
        self.close()
        self._why = None
        self._open()
        for q in self._waiters.values():
            q.put_nowait(marker)

    async def _get(self, q: asyncio.Queue, timeout_s: float) -> dict[str, Any]:
        """The next message for a waiter; asyncio.TimeoutError after ``timeout_s``, and
        every waiter fails when the endpoint was never reached within connect_timeout_s."""
        if not q.empty():  # the common case while a stream runs: no timer needed
            return q.get_nowait()
        end = time.monotonic() + timeout_s
        while True:
            until = min(end, self._link.deadline() or end)
            try:
                async with asyncio.timeout(max(0.0, until - time.monotonic())):
                    return await q.get()
            except TimeoutError:
                if self._link.expired():
                    self._give_up()  # q now holds the marker
                elif time.monotonic() >= end:
                    raise

    def _ensure_reader(self) -> None:
        self._check_link()
        if self._refused:
            raise Refused("unauthorized", self._refused.message)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._unwatch()
            loop.add_reader(self._sock.FD, self._drain)
            loop.add_reader(self._mon.FD, self._check_link)
            self._loop = loop
            self._drain()  # what arrived while no loop watched

    def _unwatch(self) -> None:
        if self._loop is not None and not self._loop.is_closed() and not self._sock.closed:
            self._loop.remove_reader(self._sock.FD)
            self._loop.remove_reader(self._mon.FD)
        self._loop = None

    def _drain(self) -> None:
        """Deliver every message waiting on the socket. ZeroMQ's descriptor signals a change,
        not a level: each wake-up must empty the socket (and so must each send, which may
        take the signal)."""
        sock = self._sock
        while not sock.closed and sock.getsockopt(_EVENTS) & _POLLIN:  # no zmq.Again raised per wake-up
            self._deliver(sock.recv_multipart(zmq.NOBLOCK))

    def _check_link(self) -> None:
        """Handle the link events queued so far, at once (no await: nothing can register in
        between): a disconnect fails what is in flight then. Called when the monitor socket
        signals, and before every new request, so that a disconnect queued while the loop did
        not watch (an idle client, a loop that was not running) cannot fail a request sent after it."""
        if self._mon.closed:
            return
        lost, self._why = _link_events(self._mon, self._link, self._why, self._curve is not None)
        self._refused = self._refused or (self._why if self._why and self._why.final else None)
        if lost:  # what arrived before the break still counts; the rest is lost
            self._drain()
            for q in self._waiters.values():
                q.put_nowait(_lost_marker(self._why))
            self._why = None

    def _deliver(self, frames: list[bytes]) -> None:
        try:
            h, _ = decode(frames)
        except ProtocolError:
            return
        rid, seq = h.get("rid"), h.get("seq")
        q = self._waiters.get(("rid", rid)) if h.get("op") in _STREAM_OPS and isinstance(rid, str) else None
        if q is None and isinstance(seq, int):
            q = self._waiters.get(("seq", seq))
        if q is not None:
            q.put_nowait(h)

    async def _send(self, header: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
                    seq: int | None = None) -> int:
        seq = next(self._seq) if seq is None else seq
        frames = encode({"v": VERSION, **header, "seq": seq}, arrays or {})
        while True:
            try:
                self._sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                break
            except zmq.Again:  # the send queue is at its high-water mark: wait for room
                await asyncio.sleep(0.005)
        self._link.sent()
        self._drain()  # the send may have taken the descriptor's signal for waiting replies
        return seq

    async def _call(self, header: dict[str, Any], timeout_s: float | None = None) -> dict[str, Any]:
        self._ensure_reader()
        seq = next(self._seq)
        key = ("seq", seq)
        q: asyncio.Queue = asyncio.Queue()
        self._waiters[key] = q
        try:
            await self._send(header, seq=seq)
            try:
                h = await self._get(q, timeout_s or self.timeout_s)
            except asyncio.TimeoutError:
                raise _timeout_error(self.endpoint, timeout_s or self.timeout_s) from None
        finally:
            self._waiters.pop(key, None)
        _raise_for(h, self._link)
        return h

    async def _next_for(self, rid: str, timeout_s: float) -> dict[str, Any]:
        q = self._waiters[("rid", rid)]
        try:
            h = await self._get(q, timeout_s)
        except asyncio.TimeoutError:
            self._waiters.pop(("rid", rid), None)
            await self._send({"op": "cancel", "rid": rid})
            raise _timeout_error(self.endpoint, timeout_s) from None
        if not h.get("ok", False) or h.get("op") == "done":
            self._waiters.pop(("rid", rid), None)
        _raise_for(h, self._link)
        return h

    async def generate(self, prompt: str | Sequence[int], max_tokens: int = 128, temperature: float = 0.0,
                       top_p: float = 1.0, stop: Sequence[str] | None = None, mode: str | None = None,
                       stream: bool = False, seed: int | None = None, timeout_s: float | None = None,
                       rid: str | None = None, ignore_eos: bool = False,
                       drafters: Sequence[str] | None = None) -> GenerateResult | AsyncStream:
        """Coroutine; with ``stream=True`` returns an AsyncStream (``async for chunk in ...``)."""
        self._ensure_reader()
        rid = rid or uuid.uuid4().hex
        h, arrays = _generate_header(rid, prompt, max_tokens, temperature, top_p, stop, mode, stream, seed, ignore_eos,
                                     drafters)
        self._waiters[("rid", rid)] = asyncio.Queue()
        await self._send(h, arrays)
        s = AsyncStream(self, rid, timeout_s or self.timeout_s)
        if stream:
            return s
        async for _ in s:
            pass
        assert s.result is not None
        return s.result

    async def cancel(self, rid: str) -> None:
        await self._call({"op": "cancel", "rid": rid})

    async def health(self) -> dict[str, Any]:
        return await self._call({"op": "health"})

    async def stats(self, timeline: int = 0) -> dict[str, Any]:
        return await self._call({"op": "stats", **({"timeline": timeline} if timeline else {})})

    def close(self) -> None:
        self._unwatch()
        try:
            self._sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self._mon.close(0)
        self._sock.close(0)

    async def __aenter__(self) -> "AsyncClient":
        return self

    async def __aexit__(self, *exc: Any) -> None:
        self.close()


def _endpoint_and_keys(a: argparse.Namespace) -> tuple[str, CurveKeys | None]:
    """--endpoint / --client-key / --server-key, else from config.toml."""
    from cosine import config as cfgmod

    cfg = None
    path = a.config or (Path("config.toml") if Path("config.toml").is_file() else None)
    if path is not None and not (a.endpoint and a.client_key):
        try:
            cfg = cfgmod.load(path, check_engines=False)
        except cfgmod.ConfigError as e:
            if a.config:
                raise ValueError(str(e)) from None
            print(f"cosine generate: ignoring ./config.toml: {e}", file=sys.stderr)
    endpoint = a.endpoint or (cfg.controller.endpoint if cfg else "tcp://127.0.0.1:5600")
    if a.client_key or a.server_key:
        if not (a.client_key and a.server_key):
            raise ValueError("CURVE needs both --client-key (.key_secret) and --server-key (the server's .key)")
        return endpoint, CurveKeys.load(a.client_key, a.server_key)
    return endpoint, CurveKeys.from_config(cfg.security) if cfg else None


def main(argv: list[str] | None = None) -> int:
    """`cosine generate TEXT`: stream one generation from a running server."""
    ap = argparse.ArgumentParser(prog="cosine generate", description="send one prompt to a running cosine server")
    ap.add_argument("prompt")
    ap.add_argument("--endpoint", default=None, help="default: [controller] endpoint of --config, "
                    "else tcp://127.0.0.1:5600")
    ap.add_argument("--config", type=Path, default=None,
                    help="config.toml for the endpoint and, with [security] curve = true, the client keys "
                         "(default: ./config.toml when it exists)")
    ap.add_argument("--client-key", type=Path, default=None, help="CURVE: this client's .key_secret file")
    ap.add_argument("--server-key", type=Path, default=None, help="CURVE: the server's public .key file")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--top-p", type=float, default=1.0)
    ap.add_argument("--mode", default=None, choices=MODES,
                    help="how to decode (default: [controller] mode of the server)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("--stop", action="append", default=None)
    ap.add_argument("--timeout", type=float, default=600.0, help="seconds to wait for the generation (default 600)")
    ap.add_argument("--connect-timeout", type=float, default=CONNECT_TIMEOUT_S,
                    help=f"seconds to wait for a server that was never reached before failing "
                         f"(default {CONNECT_TIMEOUT_S:g}; 0: only --timeout)")
    a = ap.parse_args(argv)
    try:
        endpoint, curve = _endpoint_and_keys(a)
    except (ValueError, OSError) as e:
        print(f"cosine generate: {e}", file=sys.stderr)
        return 2
    try:
        with Client(endpoint, timeout_s=a.timeout, curve=curve, connect_timeout_s=a.connect_timeout or None) as c:
            s = c.generate(a.prompt, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                           stop=a.stop, mode=a.mode, stream=True, seed=a.seed)
            for chunk in s:
                print(chunk.text, end="", flush=True)
            st = s.result.stats if s.result else {}
            print(f"\n[{s.result.finish_reason if s.result else '?'}] {st.get('tokens')} tokens, "
                  f"{st.get('tokens_per_s', 0):.1f} tok/s, mean accepted length "
                  f"{st.get('mean_accepted_length', 0):.2f}, drafters {st.get('drafters_used')}", file=sys.stderr)
    except CosineError as e:
        print(f"cosine generate: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
