"""HTTP clients of cosine-http's `/v1/completions`, with the stdlib only.

`completion` is one streamed request (cosine-bench run --api openai times it against the
ZeroMQ client). `run_http_load` runs N closed-loop clients and counts every request the way
`cosine-bench load` counts ZeroMQ ones, so `cosine-bench chaos` can kill the gateway under
the load that a gateway loss actually hits: HTTP clients.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
from collections import Counter
from typing import Any

from cosine.bench.load import run_clients


class StatusError(Exception):
    """The gateway answered with an HTTP error (or an error event in the stream)."""

    def __init__(self, status: int, detail: str):
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


class StreamCut(ConnectionError):
    """The connection ended before the stream's ``data: [DONE]``."""


def connect(base: str, timeout_s: float) -> http.client.HTTPConnection:
    """An HTTP/1.1 connection to the gateway (opened by its first request)."""
    host, port = base.removeprefix("http://").rsplit(":", 1)
    return http.client.HTTPConnection(host, int(port), timeout=timeout_s)


def completion(base: str, key: str, model: str, prompt: str, *, max_tokens: int, mode: str | None,
               timeout_s: float, seed: int, conn: http.client.HTTPConnection | None = None) -> dict[str, Any]:
    """One streamed greedy completion: latency, time to first text and the text. ``conn``:
    a kept-alive connection to send it on, as SDKs keep theirs (left open; it must not be
    shared between threads); None = a new connection, closed after."""
    body = json.dumps({"model": model, "prompt": prompt, "max_tokens": max_tokens, "stream": True,
                       "mode": mode, "seed": seed, "ignore_eos": True})
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    own = conn is None
    conn = connect(base, timeout_s) if conn is None else conn
    try:
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body, headers)
        resp = conn.getresponse()
        if resp.status != 200:
            raise StatusError(resp.status, repr(resp.read()[:300]))
        ttft, text, done = None, [], False
        for raw in resp:
            line = raw.decode().strip()
            if line == "data: [DONE]":
                done = True
            if not line.startswith("data: ") or done:
                continue
            ev = json.loads(line[6:])
            if "error" in ev:
                raise StatusError(200, f"stream error: {ev['error']}")
            if ev["choices"] and ev["choices"][0]["text"]:
                ttft = ttft if ttft is not None else time.perf_counter() - t0
                text.append(ev["choices"][0]["text"])
        if not done:
            raise StreamCut("the stream ended without data: [DONE]")
        wall = time.perf_counter() - t0
    except BaseException:
        conn.close()  # a half-read response cannot carry the next request
        raise
    finally:
        if own:
            conn.close()
    return {"latency_s": wall, "ttft_s": ttft if ttft is not None else wall, "text": "".join(text)}


def error_kind(e: BaseException) -> str | None:
    """How a failed request is counted: "refused" (never sent), a typed failure, or None (lost:
    the client waited in vain, or something no HTTP client should see)."""
    if isinstance(e, ConnectionRefusedError):
        return "refused"
    if isinstance(e, (ConnectionError, http.client.IncompleteRead, http.client.BadStatusLine)):
        return "ConnectionLost(http)"  # reset, closed, or cut mid-stream: the gateway went away
    if isinstance(e, StatusError):
        return f"HTTP {e.status}"
    return None


def run_http_load(base: str, key: str, model: str, prompts: list[str], clients: int, duration_s: float,
                  max_tokens: int, mode: str | None, timeout_s: float, reference: dict[str, str],
                  stop: threading.Event | None = None, error_backoff_s: float = 0.1) -> dict[str, Any]:
    """N closed-loop streaming clients until ``duration_s`` or ``stop``. A refused connection is
    not a submitted request (the client backs off and tries again); greedy texts are checked
    against ``reference`` (prompt -> text)."""
    lock = threading.Lock()
    count: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    lats: list[float] = []
    mismatches: list[dict[str, Any]] = []
    untyped: list[str] = []
    t_start = time.monotonic()
    deadline = t_start + duration_s

    def client_loop(ci: int) -> None:
        k = ci
        while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
            prompt = prompts[k % len(prompts)]
            k += 1
            try:
                r = completion(base, key, model, prompt, max_tokens=max_tokens, mode=mode, timeout_s=timeout_s, seed=k)
                with lock:
                    count["submitted"] += 1
                    lats.append(r["latency_s"])
                    if r["text"] != reference.get(prompt, r["text"]):
                        mismatches.append({"prompt": prompt, "expected": reference[prompt], "got": r["text"]})
                continue
            except Exception as e:  # noqa: BLE001 - every outcome is counted, none is raised
                kind = error_kind(e)
                with lock:
                    count["refused" if kind == "refused" else "submitted"] += 1
                    if kind is None:
                        untyped.append(repr(e)[:300])
                    elif kind != "refused":
                        errors[kind] += 1
            time.sleep(error_backoff_s)
        with lock:
            count["finished_clients"] += 1

    run_clients(client_loop, clients, deadline, timeout_s, "http-client")
    typed = sum(errors.values())
    lats_sorted = sorted(lats)
    pct = (lambda q: lats_sorted[min(len(lats_sorted) - 1, int(q * len(lats_sorted)))] if lats_sorted else None)
    return {
        "api": "http", "endpoint": base, "clients": clients, "wall_s": time.monotonic() - t_start,
        "requests": {"submitted": count["submitted"], "completed": len(lats), "errors": dict(errors),
                     "errors_total": typed + len(untyped), "typed_errors": typed,
                     "lost": count["submitted"] - len(lats) - typed, "refused": count["refused"],
                     "clients_unfinished": clients - count["finished_clients"]},
        "untyped_errors": untyped[:20],
        "latency_s": {"p50": pct(0.5), "p90": pct(0.9), "max": lats_sorted[-1] if lats_sorted else None},
        "determinism": {"checked": len(lats), "mismatches": len(mismatches), "examples": mismatches[:3]},
    }
