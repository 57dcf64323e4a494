"""Worker counters: per-op counts and latency percentiles, busy vs idle time."""

from __future__ import annotations

import time
from collections import defaultdict, deque
from typing import Any

import numpy as np


class Stats:
    WINDOW = 2048  # latencies kept per op for percentiles

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.counts: dict[str, int] = defaultdict(int)
        self.errors: dict[str, int] = defaultdict(int)
        self.latency_ms: dict[str, deque[float]] = defaultdict(lambda: deque(maxlen=self.WINDOW))
        self.busy_s = 0.0
        self.idle_s = 0.0

    def record(self, op: str, seconds: float, ok: bool) -> None:
        self.counts[op] += 1
        if not ok:
            self.errors[op] += 1
        self.latency_ms[op].append(seconds * 1e3)
        self.busy_s += seconds

    def add_idle(self, seconds: float) -> None:
        self.idle_s += seconds

    def uptime_s(self) -> float:
        return time.monotonic() - self.started

    def snapshot(self) -> dict[str, Any]:
        lat = {}
        for op, xs in self.latency_ms.items():
            a = np.fromiter(xs, float)
            lat[op] = {"count": self.counts[op], "mean": float(a.mean()),
                       "p50": float(np.percentile(a, 50)), "p95": float(np.percentile(a, 95))}
        return {"steps": dict(self.counts), "errors": dict(self.errors), "busy_s": self.busy_s,
                "idle_s": self.idle_s, "op_latency_ms": lat}
