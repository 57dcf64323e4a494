"""Synchronous worker client (tests, benchmarks, the control plane's proxies) and a helper
that starts a worker subprocess and waits until it serves."""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import zmq
from zmq.utils.monitor import parse_monitor_message

from cosine.protocol import VERSION, decode, encode
from cosine.security import CurveKeys, no_reply_hint, secure_client


class WorkerError(Exception):
    """An error reply from a worker."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class WorkerLost(ConnectionError):
    """The connection to a worker that had answered closed (it exited or was killed): a
    call in flight will never be answered, so it fails now instead of at its timeout."""


class WorkerClient:
    """One DEALER connection. Not thread-safe: use it from the thread that created it."""

    def __init__(self, endpoint: str, timeout_s: float = 30.0, context: zmq.Context | None = None,
                 curve: CurveKeys | None = None):
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.curve = curve
        self.answered = False  # any reply yet: a timeout before the first may be a CURVE refusal
        self.sock = (context or zmq.Context.instance()).socket(zmq.DEALER)
        self.sock.setsockopt(zmq.LINGER, 0)
        secure_client(self.sock, curve)
        # handshakes and disconnects: a worker that was reached and then closed the
        # connection (exit, kill -9) fails calls at once, not after timeout_s
        self.mon = self.sock.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED | zmq.EVENT_DISCONNECTED,
                                                addr=f"inproc://cosine-worker-monitor-{uuid.uuid4().hex}")
        self.reached = False  # a handshake ever succeeded
        self.up = False       # ... and no disconnect since the last one
        self.sock.connect(endpoint)
        self.seq = 0

    def _link_events(self) -> bool:
        """Read the queued monitor events; True if the connection closed among them."""
        closed = False
        while self.mon.poll(0):
            event = parse_monitor_message(self.mon.recv_multipart())["event"]
            if event == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                self.reached = self.up = True
            elif event == zmq.EVENT_DISCONNECTED:
                closed, self.up = True, False
        return closed

    def _lost(self, op: str) -> WorkerLost:
        return WorkerLost(f"the connection to the worker at {self.endpoint} closed ({op} unanswered): "
                          f"the worker exited or was killed")

    def call(self, op: str, header_fields: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | None = None, timeout_s: float | None = None
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send one request and wait for its reply. Raises WorkerError / TimeoutError."""
        self.seq += 1
        seq = self.seq
        self._link_events()
        if self.reached and not self.up:  # it went away: this call would wait for a restart
            raise self._lost(op)
        self.sock.send_multipart(encode({"v": VERSION, "op": op, "seq": seq, **(header_fields or {})}, arrays),
                                 copy=False)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.mon, zmq.POLLIN)
        while True:
            left = deadline - time.monotonic()
            ready = dict(poller.poll(int(left * 1000) + 1)) if left > 0 else {}
            if self.mon in ready and self._link_events() and self.reached and self.sock not in ready:
                raise self._lost(op)
            if self.sock not in ready:
                if time.monotonic() < deadline:
                    continue
                raise TimeoutError(f"no reply to {op} seq {seq} from {self.endpoint} "
                                   f"within {self.timeout_s if timeout_s is None else timeout_s} s"
                                   + ("" if self.answered else no_reply_hint(self.curve)))
            header, out = decode(self.sock.recv_multipart(copy=False))
            self.answered = True
            if header.get("seq") != seq:
                continue  # late reply to an earlier call that timed out
            if not header.get("ok"):
                err = header.get("error") or {}
                raise WorkerError(str(err.get("code")), str(err.get("message")))
            return header, out

    def close(self) -> None:
        self.sock.disable_monitor()
        self.mon.close(0)
        self.sock.close(0)

    def __enter__(self) -> "WorkerClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spawn_worker(config_path: str | Path, name: str, timeout_s: float = 60.0,
                 extra_args: list[str] | None = None) -> subprocess.Popen:
    """Start ``cosine-worker`` as a subprocess and return once it printed READY.

    The worker's output is drained by background threads (a full pipe would block it);
    the last lines are kept on ``proc.output_tail`` and raised with any start-up failure.
    """
    cmd = [sys.executable, "-m", "cosine.workers.main", "--config", str(config_path), "--name", name,
           *(extra_args or [])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1)
    tail: collections.deque[str] = collections.deque(maxlen=200)
    ready = threading.Event()

    def pump(stream: Any, watch: bool) -> None:
        for line in stream:
            tail.append(line.rstrip("\n"))
            if watch and line.startswith("READY"):
                ready.set()

    for stream, watch in ((proc.stdout, True), (proc.stderr, False)):
        threading.Thread(target=pump, args=(stream, watch), daemon=True).start()
    proc.output_tail = tail  # type: ignore[attr-defined]

    deadline = time.monotonic() + timeout_s
    while not ready.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            if proc.poll() is None:
                proc.kill()
            proc.wait()
            time.sleep(0.1)  # let the pumps read the last lines
            why = f"exited with code {proc.returncode}" if proc.returncode is not None else "timed out"
            raise RuntimeError(f"worker {name} {why} before READY:\n" + "\n".join(tail))
    return proc


def stop_worker(proc: subprocess.Popen, timeout_s: float = 10.0) -> int:
    """SIGTERM, wait, SIGKILL if needed; returns the exit code."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode
