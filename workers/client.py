"""Synchronous worker client (tests, benchmarks, the control plane's proxies) and a helper
that starts a worker subprocess and waits until it serves."""

from __future__ import annotations

import collections
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import zmq

from cosine.protocol import VERSION, decode, encode
from cosine.security import CurveKeys, no_reply_hint, secure_client


class WorkerError(Exception):
    """An error reply from a worker."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


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
        self.sock.connect(endpoint)
        self.seq = 0

    def call(self, op: str, header_fields: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | None = None, timeout_s: float | None = None
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        """Send one request and wait for its reply. Raises WorkerError / TimeoutError."""
        self.seq += 1
        seq = self.seq
        self.sock.send_multipart(encode({"v": VERSION, "op": op, "seq": seq, **(header_fields or {})}, arrays),
                                 copy=False)
        deadline = time.monotonic() + (self.timeout_s if timeout_s is None else timeout_s)
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not self.sock.poll(int(left * 1000) + 1, zmq.POLLIN):
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
