"""Ops for weight-free drafters (domain n-gram tables, prompt lookup).

Same protocol as a neural worker, but a request's state is its token history instead of
a KV cache: `prefill`/`extend` append, `rollback` cuts, `draft` appends the fed tokens and
every chosen token but the last (the convention of docs/design.md). There is no forward
pass to verify with, so `verify` and `commit` are refused with `unknown_op`.

A lookup drafter may have nothing to propose: that step's token is -1 with probability
0 (and every later step too, unless forced). Only the tokens before the first -1 are
appended, and the reply's `length` says so; the control plane cuts the draft there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from cosine.config import ModelConfig, WorkerConfig
from cosine.protocol import ProtocolError

from . import validate as val
from .ops import Handler, Reply, WorkerOps
from .stats import Stats


class TokenDrafter(Protocol):
    def draft(self, context: np.ndarray, k: int, topk: int, temperature: float = 0.0,
              rng: np.random.Generator | None = None, forced: list[int] | None = None
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]: ...

    def full_distribution(self, context: np.ndarray, vocab_size: int | None = None,
                          temperature: float = 1.0) -> np.ndarray: ...


@dataclass
class History:
    rid: str
    tokens: list[int] = field(default_factory=list)
    last_used: float = field(default_factory=time.monotonic)
    rng: np.random.Generator = field(default_factory=np.random.default_rng)


class HistoryStore:
    """Token histories with the same budget and idle-eviction contract as KVCache."""

    def __init__(self, budget_tokens: int, max_tokens: int):
        self.budget, self.max_tokens = budget_tokens, max_tokens
        self.entries: dict[str, History] = {}
        self.freed_idle = 0

    @property
    def used(self) -> int:
        return sum(len(e.tokens) for e in self.entries.values())

    def __contains__(self, rid: str) -> bool:
        return rid in self.entries

    def __len__(self) -> int:
        return len(self.entries)

    def get(self, rid: str) -> History:
        e = self.entries.get(rid)
        if e is None:
            raise ProtocolError("unknown_request", f"request {rid!r} is not held by this worker "
                                                   f"(never prefilled, released, or freed after being idle)")
        return e

    def check_budget(self, delta: int, what: str) -> None:
        if delta > 0 and self.used + delta > self.budget:
            raise ProtocolError("capacity", f"{what}: {delta} more tokens exceed the budget "
                                            f"({self.used}/{self.budget} used); retry later or elsewhere")

    def release(self, rid: str) -> bool:
        return self.entries.pop(rid, None) is not None

    def evict_idle(self, idle_timeout_s: float, now: float | None = None) -> list[str]:
        import logging

        now = time.monotonic() if now is None else now
        gone = [r for r, e in self.entries.items() if now - e.last_used > idle_timeout_s]
        for r in gone:
            logging.getLogger("cosine.worker.history").warning(
                "freed idle request %r after %.0f s untouched", r, now - self.entries[r].last_used)
            del self.entries[r]
        self.freed_idle += len(gone)
        return gone


class WeightFreeOps(WorkerOps):
    """A weight-free drafter: prefill, extend, rollback and draft over token histories."""

    def __init__(self, drafter: TokenDrafter, store: HistoryStore, vocab_size: int, worker: WorkerConfig,
                 model: ModelConfig, stats: Stats, summary: dict[str, Any]):
        self.drafter, self.cache, self.V = drafter, store, vocab_size
        self.worker, self.model, self.stats, self.summary = worker, model, stats, summary
        self.handlers: dict[str, Handler] = {
            "prefill": self.prefill, "draft": self.draft, "extend": self.extend, "rollback": self.rollback,
            "release": self.release, "health": self.health, "stats": self.stats_op,
        }

    def handle(self, header: dict[str, Any], arrays: dict[str, np.ndarray]) -> Reply:
        op = header.get("op")
        if op in ("verify", "commit"):
            raise ProtocolError("unknown_op", f"{op!r}: worker {self.worker.name!r} serves a weight-free "
                                              f"{self.model.kind} drafter, which cannot score token trees")
        return super().handle(header, arrays)

    def _fits(self, rid: str, length: int) -> None:
        if length > self.cache.max_tokens:
            raise ProtocolError("too_long", f"request {rid!r}: {length} tokens exceed the context of "
                                            f"{self.cache.max_tokens}")

    def _held(self, rid: str) -> History:
        e = self.cache.get(rid)
        e.last_used = time.monotonic()
        return e

    @staticmethod
    def _lengths(entries: list[History]) -> list[dict[str, Any]]:
        return [{"rid": e.rid, "length": len(e.tokens)} for e in entries]

    def _tokens(self, h: dict[str, Any], arrs: dict[str, np.ndarray], **kw: Any) -> tuple[list, list[np.ndarray]]:
        reqs = val.requests(h, {"n"}, **kw)
        ns = [val.int_field(r, "n", 0) for r in reqs]
        a = val.arrays(arrs, {"tokens": ("int32", sum(ns))})
        val.token_range("tokens", a["tokens"], self.V)
        return reqs, val.split(a["tokens"], ns)

    def prefill(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        reqs, toks = self._tokens(h, arrs, dup_code="duplicate_request")
        for r, t in zip(reqs, toks):
            if r["rid"] in self.cache:
                raise ProtocolError("duplicate_request", f"request {r['rid']!r} is already held; release it first")
            self._fits(r["rid"], t.size)
        self.cache.check_budget(sum(t.size for t in toks), "prefill")
        entries = [History(r["rid"], t.tolist()) for r, t in zip(reqs, toks)]
        self.cache.entries.update({e.rid: e for e in entries})
        return {"requests": self._lengths(entries)}, {}

    def extend(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        reqs, toks = self._tokens(h, arrs)
        entries = [self._held(r["rid"]) for r in reqs]
        for e, t in zip(entries, toks):
            self._fits(e.rid, len(e.tokens) + t.size)
        self.cache.check_budget(sum(t.size for t in toks), "extend")
        for e, t in zip(entries, toks):
            e.tokens += t.tolist()
        return {"requests": self._lengths(entries)}, {}

    def rollback(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        reqs = val.requests(h, {"length"})
        val.arrays(arrs, {})
        entries = [self._held(r["rid"]) for r in reqs]
        lengths = [val.int_field(r, "length", 0, len(e.tokens)) for r, e in zip(reqs, entries)]
        for e, n in zip(entries, lengths):
            del e.tokens[n:]
        return {"requests": self._lengths(entries)}, {}

    def draft(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        plans = val.draft_plans(h, arrs, self.V, self.cache.get, lambda e: len(e.tokens))
        for p in plans:
            self._fits(p.entry.rid, (len(p.entry.tokens) if p.keep is None else p.keep) + p.feed.size + p.k - 1)
        self.cache.check_budget(sum(p.feed.size + p.k for p in plans), "draft")

        width = max((p.topk for p in plans), default=0)
        rows: dict[str, list[np.ndarray]] = {"tokens": [], "token_probs": [], "topk_ids": [], "topk_probs": []}
        probs_rows: list[np.ndarray] = []
        want_probs = any(p.return_probs for p in plans)
        out_reqs = []
        for p in plans:
            e, keep, feed, k, topk, temp, ret_probs, seed, forced = (p.entry, p.keep, p.feed, p.k, p.topk,
                                                                     p.temperature, p.return_probs, p.seed, p.forced)
            e.last_used = time.monotonic()
            if keep is not None:
                del e.tokens[keep:]
            e.tokens += feed.tolist()
            rng = np.random.default_rng(seed) if seed is not None else e.rng
            ctx = np.asarray(e.tokens, np.int64)
            toks, tprobs, tids, tps = self.drafter.draft(ctx, k, topk, temp, rng, forced)
            toks = np.asarray(toks, np.int64)
            pad = lambda m, fill: np.pad(np.asarray(m).reshape(k, -1)[:, :width],  # noqa: E731
                                         ((0, 0), (0, width - min(width, np.asarray(m).reshape(k, -1).shape[1]))),
                                         constant_values=fill)
            rows["tokens"].append(toks.astype(np.int32))
            rows["token_probs"].append(np.asarray(tprobs, np.float32))
            rows["topk_ids"].append(pad(tids, -1).astype(np.int32) if topk else np.full((k, width), -1, np.int32))
            rows["topk_probs"].append(pad(tps, 0).astype(np.float32) if topk else np.zeros((k, width), np.float32))
            valid = int(np.argmax(toks < 0)) if (toks < 0).any() else k
            if want_probs:
                for i in range(k):
                    probs_rows.append(self.drafter.full_distribution(np.concatenate([ctx, toks[:i]]), self.V,
                                                                     temp if temp > 0 else 1.0).astype(np.float32)
                                      if ret_probs and i < valid else np.zeros(self.V, np.float32))
            e.tokens += toks[:min(valid, k - 1)].tolist()
            out_reqs.append({"rid": e.rid, "length": len(e.tokens), "k": k})
        out = {n: (np.concatenate(v) if v else np.zeros((0, width) if n.startswith("topk") else 0,
                                                          np.int32 if n in ("tokens", "topk_ids") else np.float32))
               for n, v in rows.items()}
        if want_probs:
            out["probs"] = np.stack(probs_rows)
        return {"requests": out_reqs}, out

    def engine_summary(self) -> dict[str, Any]:
        return self.summary
