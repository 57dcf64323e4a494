"""The worker ops of docs/protocol.md: what every worker kind shares (dispatch, release,
health, stats). The kinds: ``NeuralOps`` (neural.py: an engine and its KV cache) and
``WeightFreeOps`` (weightfree.py: n-gram tables and prompt lookup over token histories).

Each op validates the whole message first (a plan of what to do per request) and only
then changes state, so one bad request fails the message with nothing changed.
"""

from __future__ import annotations

import logging
import os
import resource
from typing import Any, Callable

import numpy as np

from cosine.config import ModelConfig, WorkerConfig
from cosine.protocol import VERSION, ProtocolError

from . import validate as val
from .stats import Stats

log = logging.getLogger("cosine.worker.ops")

# An op's reply: header fields and named arrays (cosine.protocol frames them).
Reply = tuple[dict[str, Any], dict[str, np.ndarray]]
Handler = Callable[[dict[str, Any], dict[str, np.ndarray]], Reply]


class WorkerOps:
    """What every worker kind shares: op dispatch, release, health and stats. Subclasses
    set ``handlers``, ``cache`` (KVCache or HistoryStore), ``worker``, ``model``, ``stats``."""

    handlers: dict[str, Handler]
    cache: Any
    worker: WorkerConfig
    model: ModelConfig
    stats: Stats

    def handle(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        op = header.get("op")
        fn = self.handlers.get(op) if isinstance(op, str) else None
        if fn is None:
            raise ProtocolError("unknown_op", f"unknown op {op!r}; ops: {sorted(self.handlers)}")
        return fn(header, arrays)

    def engine_summary(self) -> dict[str, Any]:
        raise NotImplementedError

    def release(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        every = h.get("all", False)
        if not isinstance(every, bool):
            raise val.bad(f"header 'all' must be a bool, got {every!r}")
        if every:
            # A (re)started control plane frees what an earlier one left behind (it died
            # before releasing): everything except the rids that start with keep_prefix.
            keep = h.get("keep_prefix", "")
            if not isinstance(keep, str):
                raise val.bad(f"header 'keep_prefix' must be a string, got {keep!r}")
            if h.get("rids") not in (None, []):
                raise val.bad("give either 'rids' or 'all': true, not both")
            val.arrays(arrs, {})
            rids = [r for r in list(self.cache.entries) if not (keep and r.startswith(keep))]
            for rid in rids:
                self.cache.release(rid)
            if rids:
                log.warning("released %d request(s) on request of a (re)started control plane (keep_prefix=%r)",
                            len(rids), keep)
            return {"released": rids, "unknown": []}, {}
        if "keep_prefix" in h:
            raise val.bad("'keep_prefix' only goes with 'all': true")
        rids = h.get("rids")
        if not isinstance(rids, list) or not all(isinstance(r, str) for r in rids):
            raise val.bad(f"header 'rids' must be a list of strings, got {rids!r}")
        val.arrays(arrs, {})
        released, unknown = [], []
        for rid in rids:
            (released if self.cache.release(rid) else unknown).append(rid)
        return {"released": released, "unknown": unknown}, {}

    def health(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        return {"name": self.worker.name, "role": self.model.role, "model": self.model.name,
                "provider": self.worker.provider, "device": self.worker.device, "pid": os.getpid(),
                "uptime_s": self.stats.uptime_s(), "protocol": VERSION, "engine": self.engine_summary()}, {}

    def stats_op(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        return {"requests_held": len(self.cache), "cache_tokens_used": self.cache.used,
                "cache_tokens_budget": self.cache.budget, "freed_idle": self.cache.freed_idle,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                **self.stats.snapshot(), **self.engine_stats()}, {}

    def engine_stats(self) -> dict[str, Any]:
        """Counters of the engine behind the ops, for the stats op."""
        return {}
