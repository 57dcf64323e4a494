"""The worker's ZeroMQ server: two pipelined stages.

I/O thread: owns the ROUTER socket. Receives and decodes requests (rejecting malformed
frames, wrong versions and repeated seqs itself) into a queue, and sends the replies the
compute thread hands back over an inproc PAIR socket.
Compute thread: owns the other PAIR end; runs ops one at a time and encodes replies.

So decoding the next request and sending finished replies overlap the engine forward,
and every zmq socket is used by exactly one thread.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections import OrderedDict
from typing import TYPE_CHECKING, Any

import msgpack
import numpy as np
import zmq

from cosine.config import SecurityConfig
from cosine.protocol import VERSION, ProtocolError, decode, encode, error_reply, ok_reply
from cosine.security import secure_server

from .kvcache import KVCache
from .ops import WorkerOps
from .stats import Stats

if TYPE_CHECKING:
    from .weightfree import HistoryStore

log = logging.getLogger("cosine.worker.server")

_instance = itertools.count()
MAX_PEERS = 65536  # seq state kept for this many connections (oldest forgotten first)


def _peek_header(frame: Any) -> dict[str, Any] | None:
    """Best-effort header of a message that failed to decode, to echo op/seq and spot versions."""
    try:
        h = msgpack.unpackb(bytes(frame), raw=False, strict_map_key=True)
    except Exception:
        return None
    return h if isinstance(h, dict) else None


class WorkerServer:
    def __init__(self, ops: WorkerOps, cache: KVCache | HistoryStore, stats: Stats, endpoint: str, max_message_bytes: int,
                 idle_timeout_s: float, context: zmq.Context | None = None, security: SecurityConfig | None = None):
        self.ops = ops
        self.cache = cache
        self.stats = stats
        self.endpoint = endpoint
        self.max_message_bytes = max_message_bytes
        self.idle_timeout_s = idle_timeout_s
        self.security = security or SecurityConfig()
        self.ctx = context or zmq.Context.instance()
        self._inproc = f"inproc://cosine-worker-replies-{next(_instance)}"
        self._queue: queue.Queue[tuple[bytes, dict[str, Any], dict[str, np.ndarray]] | None] = queue.Queue()
        self._stop = threading.Event()
        self._bound = threading.Event()
        self._bind_error: BaseException | None = None
        self._last_seq: OrderedDict[bytes, int] = OrderedDict()
        self._io = threading.Thread(target=self._io_loop, name="worker-io", daemon=True)
        self._compute = threading.Thread(target=self._compute_loop, name="worker-compute", daemon=True)

    # ----- lifecycle ---------------------------------------------------------------------
    def start(self, timeout_s: float = 10.0) -> None:
        """Bind (in the I/O thread, which owns the socket) and start both stages."""
        self._io.start()
        if not self._bound.wait(timeout_s):
            raise RuntimeError(f"worker socket did not bind {self.endpoint} within {timeout_s} s")
        if self._bind_error is not None:
            raise RuntimeError(f"cannot bind {self.endpoint}: {self._bind_error}") from self._bind_error
        self._compute.start()

    def stop(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._queue.put(None)  # wakes the compute thread now rather than at its next tick
        for t in (self._compute, self._io):
            if t.is_alive():
                t.join(timeout_s)

    # ----- I/O stage ---------------------------------------------------------------------
    def _io_loop(self) -> None:
        router = self.ctx.socket(zmq.ROUTER)
        router.setsockopt(zmq.LINGER, 0)
        pair = self.ctx.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        try:
            secure_server(router, self.security, endpoint=self.endpoint, max_message_bytes=self.max_message_bytes,
                          what="cosine-worker")
            router.bind(self.endpoint)
            pair.bind(self._inproc)
        except (zmq.ZMQError, OSError, ValueError) as e:  # port taken, unreadable key file
            self._bind_error = e
            router.close()
            pair.close()
            self._bound.set()
            return
        self._bound.set()
        poller = zmq.Poller()
        poller.register(router, zmq.POLLIN)
        poller.register(pair, zmq.POLLIN)
        try:
            while not self._stop.is_set():
                events = dict(poller.poll(100))
                if pair in events:  # replies first: they free clients to send more work
                    self._drain(pair, lambda frames: router.send_multipart(frames, copy=False))
                if router in events:
                    self._drain(router, lambda frames: self._intake(router, frames))
        except Exception:
            log.exception("I/O thread failed; the worker stops serving")
            self._stop.set()
        finally:
            router.close()
            pair.close()

    @staticmethod
    def _drain(sock: zmq.Socket, handle: Any, limit: int = 64) -> None:
        for _ in range(limit):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            handle(frames)

    def _intake(self, router: zmq.Socket, frames: list[zmq.Frame]) -> None:
        """Decode and admit one request, or answer it here if it cannot be admitted."""
        ident = frames[0].bytes
        body = [f.buffer for f in frames[1:]]
        header: dict[str, Any] | None = None
        try:
            try:
                header, arrays = decode(body)
            except ProtocolError:
                header = _peek_header(body[0]) if body else None
                if header is not None and header.get("v", VERSION) != VERSION:
                    raise ProtocolError("version", f"protocol version {header.get('v')!r} not supported; "
                                                   f"this worker speaks {VERSION}") from None
                raise
            v = header.get("v")
            if v != VERSION:
                raise ProtocolError("version", f"protocol version {v!r} not supported; this worker speaks {VERSION}")
            seq = header.get("seq")
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise ProtocolError("bad_request", f"header 'seq' must be an int, got {seq!r}")
            last = self._last_seq.get(ident)
            if last is not None and seq <= last:
                raise ProtocolError("duplicate_seq", f"seq {seq} already seen on this connection "
                                                     f"(last {last}); seq must strictly increase")
            self._last_seq[ident] = seq
            self._last_seq.move_to_end(ident)
            if len(self._last_seq) > MAX_PEERS:
                self._last_seq.popitem(last=False)
        except ProtocolError as err:
            log.info("rejected message: %s", err)
            router.send_multipart([ident, *encode(error_reply(header, err))], copy=False)
            return
        self._queue.put((ident, header, arrays))

    # ----- compute stage -----------------------------------------------------------------
    def _compute_loop(self) -> None:
        pair = self.ctx.socket(zmq.PAIR)
        pair.setsockopt(zmq.LINGER, 0)
        pair.connect(self._inproc)
        tick = max(0.01, min(1.0, self.idle_timeout_s / 4))
        next_evict = time.monotonic() + tick
        try:
            while not self._stop.is_set():
                t0 = time.monotonic()
                if t0 >= next_evict:
                    self.cache.evict_idle(self.idle_timeout_s, t0)
                    next_evict = t0 + tick
                try:
                    item = self._queue.get(timeout=max(0.0, next_evict - t0))
                except queue.Empty:
                    item = None
                if item is None:  # eviction tick or stop
                    self.stats.add_idle(time.monotonic() - t0)
                    continue
                ident, header, arrays = item
                t1 = time.monotonic()
                self.stats.add_idle(t1 - t0)
                frames, ok = self._run(header, arrays)
                op = header.get("op")
                known = isinstance(op, str) and op in self.ops.handlers  # op may be any msgpack value
                self.stats.record(op if known else "unknown", time.monotonic() - t1, ok)
                pair.send_multipart([ident, *frames], copy=False)
        except Exception:
            log.exception("compute thread failed; the worker stops serving")
            self._stop.set()
        finally:
            pair.close()

    def _run(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[list[Any], bool]:
        """One op -> reply frames. Errors become error replies; the worker keeps serving."""
        try:
            fields, out = self.ops.handle(header, arrays)
            return encode(ok_reply(header, **fields), out), True
        except ProtocolError as err:
            log.info("op %r seq %r failed: %s", header.get("op"), header.get("seq"), err)
            return encode(error_reply(header, err)), False
        except Exception as e:
            log.exception("op %r seq %r raised", header.get("op"), header.get("seq"))
            err = ProtocolError("internal", f"{type(e).__name__}: {e}")
            return encode(error_reply(header, err)), False

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()
