"""The ops of a neural worker: an engine (ONNX Runtime) and its KV cache.

Forwards are batched over the message's requests (split at ``max_batch``); a draft op's
token choices and its early stop are workers/sampling.py.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from cosine.config import LimitsConfig, ModelConfig, WorkerConfig
from cosine.protocol import ProtocolError
from cosine.tree import TreeError, depths, validate_parents

from . import validate as val
from .batching import Feed, chain, run_batched
from .engine import Engine
from .kvcache import Entry, KVCache, check_commit_nodes
from .ops import Handler, Reply, WorkerOps
from .sampling import ChainStop, choose, softmax, top_tokens
from .stats import Stats
from .validate import DraftRequest


class NeuralOps(WorkerOps):
    """A neural worker: a target (prefill, verify, commit) or a model drafter (prefill, draft)."""

    def __init__(self, engine: Engine, cache: KVCache, worker: WorkerConfig, model: ModelConfig,
                 limits: LimitsConfig, stats: Stats, prefill_engine: Engine | None = None):
        """``prefill_engine``: the same model exported otherwise (float weights), for prompt
        tokens only (``[[models]] prefill_engine``): on a CPU a float prefill is faster
        than the int8 path, while decoding and verification stay on ``engine``."""
        self.engine, self.cache, self.limits, self.V = engine, cache, limits, engine.vocab_size
        self.prefill_engine = prefill_engine
        self.worker, self.model, self.stats = worker, model, stats
        self.handlers: dict[str, Handler] = {
            "prefill": self.prefill, "draft": self.draft, "extend": self.extend, "rollback": self.rollback,
            "verify": self.verify, "commit": self.commit, "release": self.release,
            "health": self.health, "stats": self.stats_op,
        }

    # ----- shared checks ------------------------------------------------------------
    def _held(self, rid: str) -> Entry:
        return self.cache.get(rid)

    def _fits(self, rid: str, length: int) -> None:
        if length > self.engine.max_positions:
            raise ProtocolError("too_long", f"request {rid!r}: {length} tokens exceed the engine's context of "
                                            f"{self.engine.max_positions}")

    def _lengths(self, entries: list[Entry]) -> list[dict[str, Any]]:
        return [{"rid": e.rid, "length": e.length} for e in entries]

    def _touch(self, entries: list[Entry]) -> None:
        now = time.monotonic()
        for e in entries:
            e.last_used = now

    def _append_chains(self, entries: list[Entry], tokens: list[np.ndarray],
                       last_logits: list[int] | None = None, engine: Engine | None = None) -> list[np.ndarray]:
        """Feed each request its tokens (t >= 1) in one batched pass; returns the logits of
        each request's last ``last_logits[i]`` tokens (at least one row; all when None)."""
        lasts = last_logits or [None] * len(entries)
        feeds = [chain(e, t, n) for e, t, n in zip(entries, tokens, lasts)]
        results = run_batched(engine or self.engine, feeds, self.worker.max_batch)
        for e, r in zip(entries, results):
            self.cache.append(e, r.k, r.v)
        return [r.logits for r in results]

    # ----- ops ------------------------------------------------------------------------
    def prefill(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        """``n`` tokens per request into a new cache entry. ``prompt`` (default n): how many
        of them are prompt tokens; with a prefill engine only those go through it, and the
        rest (a request prefilled again after a verifier loss holds output tokens too) through
        the engine that decoded them, so the cache is what the first run computed."""
        reqs = val.requests(h, {"n", "prompt"}, dup_code="duplicate_request")
        ns = [val.int_field(r, "n", 0) for r in reqs]
        prompts = [val.int_field(r, "prompt", 0, n, default=n) for r, n in zip(reqs, ns)]
        a = val.arrays(arrs, {"tokens": ("int32", sum(ns))})
        val.token_range("tokens", a["tokens"], self.V)
        for r, n in zip(reqs, ns):
            if r["rid"] in self.cache:
                raise ProtocolError("duplicate_request", f"request {r['rid']!r} is already held; release it first")
            self._fits(r["rid"], n)
        self.cache.check_budget(sum(ns), "prefill")

        entries = [self.cache.create(r["rid"], reserve=n) for r, n in zip(reqs, ns)]
        try:
            parts = list(zip(entries, val.split(a["tokens"], ns), prompts))
            if self.prefill_engine is None:
                stages = [(self.engine, [(e, t) for e, t, _ in parts])]
            else:
                stages = [(self.prefill_engine, [(e, t[:k]) for e, t, k in parts]),
                          (self.engine, [(e, t[k:]) for e, t, k in parts])]
            for engine, chunks in stages:
                work = [(e, t) for e, t in chunks if t.size]
                if work:  # no logits wanted: the engine computes one row each
                    self._append_chains([e for e, _ in work], [t for _, t in work], [1] * len(work), engine)
        except BaseException:
            for e in entries:  # all or nothing: no half-prefilled requests
                self.cache.release(e.rid)
            raise
        return {"requests": self._lengths(entries)}, {}

    def extend(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        reqs = val.requests(h, {"n"})
        ns = [val.int_field(r, "n", 0) for r in reqs]
        a = val.arrays(arrs, {"tokens": ("int32", sum(ns))})
        val.token_range("tokens", a["tokens"], self.V)
        entries = [self._held(r["rid"]) for r in reqs]
        for e, n in zip(entries, ns):
            self._fits(e.rid, e.length + n)
        self.cache.check_budget(sum(e.length + n - e.tokens for e, n in zip(entries, ns)), "extend")

        self._touch(entries)
        work = [(e, t) for e, t in zip(entries, val.split(a["tokens"], ns)) if t.size]
        if work:
            self._append_chains([e for e, _ in work], [t for _, t in work], [1] * len(work))
        return {"requests": self._lengths(entries)}, {}

    def rollback(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        reqs = val.requests(h, {"length"})
        val.arrays(arrs, {})
        entries = [self._held(r["rid"]) for r in reqs]
        lengths = [val.int_field(r, "length", 0, e.length) for r, e in zip(reqs, entries)]
        self._touch(entries)
        for e, n in zip(entries, lengths):
            self.cache.truncate(e, n)
        return {"requests": self._lengths(entries)}, {}

    def draft(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        plans = val.draft_plans(h, arrs, self.V, self._held, lambda e: e.length)
        growth = 0
        for p in plans:
            final = (p.entry.length if p.keep is None else p.keep) + p.feed.size + p.k - 1
            self._fits(p.entry.rid, final)
            growth += final - p.entry.tokens
        self.cache.check_budget(growth, "draft")

        self._touch([p.entry for p in plans])
        for p in plans:
            if p.keep is not None:
                self.cache.truncate(p.entry, p.keep)
        rngs = [np.random.default_rng(p.seed) if p.seed is not None else p.entry.rng for p in plans]
        chosen: list[list[tuple[int, np.ndarray]]] = [[] for _ in plans]  # per request: (token, probs)
        inputs = [p.feed for p in plans]
        stops = [ChainStop.of(p) for p in plans]
        stopped: set[int] = set()
        active = list(range(len(plans)))
        while active:
            # A run of forced steps needs no choice in between: their tokens ride along in
            # one forward, one logits row per step (guided drafting: a weight-free drafter's
            # chain scored in one pass instead of one pass per token).
            runs = [_forced_run(plans[i], len(chosen[i])) for i in active]
            feeds = [np.concatenate([inputs[i], np.asarray(plans[i].forced[len(chosen[i]):len(chosen[i]) + m],
                                                           np.int64)]) if m else inputs[i]
                     for i, m in zip(active, runs)]
            # logits for the forced steps and the free one after them: not for catch-up tokens
            logits = self._append_chains([plans[i].entry for i in active], feeds, [m + 1 for m in runs])
            for i, m, lg in zip(active, runs, logits):
                p = plans[i]
                for row in lg:
                    step = len(chosen[i])
                    probs = softmax(row, p.temperature)
                    tok = choose(row, probs, p.temperature, rngs[i])
                    if p.forced is not None and p.forced[step] >= 0:
                        tok = p.forced[step]
                    chosen[i].append((tok, probs))
                    if stops[i].after(step, float(probs[tok])):
                        stopped.add(i)
                inputs[i] = np.array([chosen[i][-1][0]], np.int64)
            # The last chosen token is not fed (the caller's convention, docs/design.md).
            active = [i for i in active if len(chosen[i]) < plans[i].k and i not in stopped]

        return self._draft_reply(plans, chosen)

    def _draft_reply(self, plans: list[DraftRequest], chosen: list[list[tuple[int, np.ndarray]]]) -> Reply:
        R = sum(p.k for p in plans)
        width = max((p.topk for p in plans), default=0)
        tokens = np.full(R, -1, np.int32)  # -1: a chain that stopped early ends there
        token_probs = np.zeros(R, np.float32)
        topk_ids = np.full((R, width), -1, np.int32)
        topk_probs = np.zeros((R, width), np.float32)
        want_probs = any(p.return_probs for p in plans)
        probs_out = np.zeros((R, self.V), np.float32) if want_probs else None
        row = 0
        for p, steps in zip(plans, chosen):
            end = row + p.k
            for tok, probs in steps:
                tokens[row] = tok
                token_probs[row] = probs[tok]
                if p.topk:
                    top = top_tokens(probs, p.topk)
                    topk_ids[row, :p.topk] = top
                    topk_probs[row, :p.topk] = probs[top]
                if probs_out is not None and p.return_probs:
                    probs_out[row] = probs
                row += 1
            row = end
        out = {"tokens": tokens, "token_probs": token_probs, "topk_ids": topk_ids, "topk_probs": topk_probs}
        if probs_out is not None:
            out["probs"] = probs_out
        # "k": the steps drafted (fewer than asked when a chain stopped early)
        reqs = [{"rid": p.entry.rid, "length": p.entry.length, "k": len(steps)} for p, steps in zip(plans, chosen)]
        return {"requests": reqs}, out

    def verify(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        ret = h.get("return", "argmax")
        if ret not in ("argmax", "logits"):
            raise val.bad(f"'return' must be 'argmax' or 'logits', got {ret!r}")
        reqs = val.requests(h, {"n", "commit"})
        ns = [val.int_field(r, "n", 1, self.limits.max_tree_nodes) for r in reqs]
        a = val.arrays(arrs, {"tokens": ("int32", sum(ns)), "parents": ("int32", sum(ns))})
        val.token_range("tokens", a["tokens"], self.V)
        feeds: list[Feed] = []
        plans: list[tuple[Entry, list[int] | None, np.ndarray]] = []
        growth = 0
        for r, toks, par in zip(reqs, val.split(a["tokens"], ns), val.split(a["parents"], ns)):
            e = self._held(r["rid"])
            try:
                parents = validate_parents(par)
            except TreeError as err:
                raise val.bad(f"request {e.rid!r}: bad tree: {err}") from None
            commit = r.get("commit")
            if commit is not None:
                check_commit_nodes(e.rid, e.pending, commit)
            base = e.length + (len(commit) if commit else 0)
            d = depths(parents)
            self._fits(e.rid, base + int(d.max()) + 1)
            growth += base + parents.size - e.tokens
            plans.append((e, commit, parents))
            feeds.append(Feed(e, toks, d + base, parents))
        self.cache.check_budget(growth, "verify")

        self._touch([e for e, _, _ in plans])
        for e, commit, _ in plans:
            if commit:
                self.cache.commit(e, commit)
            e.pending = None  # an uncommitted tree from the previous verify is discarded
        results = run_batched(self.engine, feeds, self.worker.max_batch)
        for (e, _, parents), res in zip(plans, results):
            self.cache.set_pending(e, parents, res.k, res.v)
        logits = np.concatenate([res.logits for res in results]) if results else np.zeros((0, self.V), np.float32)
        out = {"argmax": logits.argmax(-1).astype(np.int32)}
        if ret == "logits":
            out["logits"] = np.ascontiguousarray(logits, np.float32)
        return {"requests": self._lengths([e for e, _, _ in plans])}, out

    def commit(self, h: dict[str, Any], arrs: dict[str, np.ndarray]) -> Reply:
        reqs = val.requests(h, {"nodes"})
        val.arrays(arrs, {})
        entries = [self._held(r["rid"]) for r in reqs]
        nodes = [check_commit_nodes(e.rid, e.pending, r.get("nodes")) for r, e in zip(reqs, entries)]
        self._touch(entries)
        for e, n in zip(entries, nodes):
            self.cache.commit(e, n)
        return {"requests": self._lengths(entries)}, {}

    def engine_summary(self) -> dict[str, Any]:
        out = self.engine.summary()
        if self.prefill_engine is not None:
            out["prefill_engine"] = {"dir": str(self.prefill_engine.dir), "dtype": self.prefill_engine.dtype.name,
                                     "quantization": (self.prefill_engine.manifest.get("quantization") or {}).get("mode")}
        return out

    def engine_stats(self) -> dict[str, Any]:
        # tree nodes laid out unlike decoding (cosine/keyslots.py): 0 while serve prunes
        # greedy trees to their exact nodes
        return {"inexact_nodes": self.engine.inexact_nodes}


def _forced_run(p: val.DraftRequest, step: int) -> int:
    """Forced steps from ``step`` on whose tokens are fed (all but the op's last step)."""
    m = 0
    if p.forced is not None:
        while step + m < p.k - 1 and p.forced[step + m] >= 0:
            m += 1
    return m
