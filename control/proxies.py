"""The objects behind the worker proxy actors: each owns one worker's DEALER connection.

``DrafterProxy`` also keeps the bookkeeping of what its worker's cache holds per request,
so callers only say "draft k tokens after this context" and the proxy works out
``keep``/``feed`` by the system convention (docs/design.md): the cache never holds the
context's last token; it is rolled back to the longest common prefix and the rest is fed.

Pure apart from the connection, which ``connect`` makes (a ``WorkerClient`` by default;
``connect=`` gives tests a fake worker). The actors (control/actors.py) connect on their
own thread, since a ZeroMQ socket belongs to one thread.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Protocol

import numpy as np

from cosine.security import CurveKeys
from cosine.workers.client import WorkerClient, WorkerError

from .ports import told

log = logging.getLogger("cosine.control.proxies")


class Connection(Protocol):
    """What a proxy needs of a worker connection (``WorkerClient`` has it)."""

    def call(self, op: str, header_fields: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | None = None,
             timeout_s: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]: ...

    def close(self) -> None: ...


# Worker errors about particular requests, not about the worker: the drafter stays in use.
SOFT_CODES = frozenset({"bad_request", "unknown_request", "duplicate_request", "capacity", "too_long"})


def common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


def plan_feed(cached: list[int], context: list[int]) -> tuple[int | None, list[int]]:
    """(keep, feed) so that after feeding, the cache holds ``context`` (root last).

    At least the root is fed (the draft op needs n_feed >= 1); ``keep`` is None when no
    rollback is needed.
    """
    keep = min(common_prefix(cached, context), len(context) - 1)
    return (None if keep == len(cached) else keep), context[keep:]


@dataclass
class DraftJob:
    rid: str
    context: list[int]          # committed + fused prefix; its last token is the root
    k: int
    topk: int = 1
    temperature: float = 0.0
    return_probs: bool = False
    seed: int | None = None
    forced: list[int] | None = None  # per step: the token to continue from, -1 = own choice
    min_reach: list[float] | None = None  # greedy: end the chain after step j once reach < min_reach[j]


@dataclass
class DraftOut:
    tokens: list[int]
    probs: list[float]
    topk_ids: np.ndarray        # [k, topk]
    topk_probs: np.ndarray
    dists: np.ndarray | None    # [k, V] when return_probs


@dataclass
class Timed:
    value: Any
    busy_s: float
    error: str | None = None    # "dead" (timeout/transport) or "soft" (per-request trouble)
    message: str = ""
    extra: dict = field(default_factory=dict)


class WorkerProxy:
    """One worker's connection, made by ``connect`` on the thread that will use it."""

    def __init__(self, name: str, endpoint: str, timeout_s: float, curve: CurveKeys | None = None,
                 connect: Callable[[], Connection] | None = None):
        self.name, self.endpoint, self.timeout_s, self.curve = name, endpoint, timeout_s, curve
        self._connect = connect or (lambda: WorkerClient(endpoint, timeout_s, curve=curve))
        self.client: Connection | None = None

    def connect(self) -> None:
        if self.client is None:
            self.client = self._connect()

    def close(self) -> None:
        if self.client is not None:
            try:
                self.client.close()
            except Exception:  # noqa: BLE001 - closing a broken socket must not mask the real error
                pass

    def call(self, op: str, fields: dict[str, Any], arrays: dict[str, np.ndarray] | None = None,
             timeout_s: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self.connect()
        assert self.client is not None
        return self.client.call(op, fields, arrays or {}, timeout_s=timeout_s)

    def health(self, timeout_s: float | None = None) -> dict[str, Any]:
        return self.call("health", {}, timeout_s=timeout_s)[0]

    def stats(self) -> dict[str, Any]:
        return self.call("stats", {})[0]


class VerifierProxy(WorkerProxy):
    """Target worker: prefill, tree verify (with inline commit), release. Stateless."""

    def prefill(self, items: list[tuple[str, list[int], int]]) -> Timed:
        """items: (rid, tokens, how many of them are prompt tokens). The rest are output
        tokens (a request prefilled again after a verifier loss): a worker with a prefill
        engine feeds only the prompt's through it (workers/neural.py NeuralOps.prefill)."""
        t0 = time.perf_counter()
        toks = np.asarray([t for _, ts, _ in items for t in ts], dtype=np.int32)
        reqs = [{"rid": r, "n": len(ts), **({"prompt": k} if k < len(ts) else {})} for r, ts, k in items]
        try:
            self.call("prefill", {"requests": reqs}, {"tokens": toks})
        except WorkerError as e:
            return Timed(None, time.perf_counter() - t0, "soft", f"{e.code}: {e.message}", {"code": e.code})
        except (TimeoutError, OSError) as e:
            return Timed(None, time.perf_counter() - t0, "dead", f"verifier {self.name} did not answer: {e}")
        return Timed(None, time.perf_counter() - t0)

    def verify(self, items: list[tuple[str, np.ndarray, np.ndarray, list[int] | None]], logits: bool) -> Timed:
        """items: (rid, tokens, parents, commit nodes of the previous round or None).

        Returns per-rid (argmax [n], logits [n, V] or None)."""
        t0 = time.perf_counter()
        reqs = [{"rid": r, "n": int(len(tok)), **({"commit": c} if c is not None else {})} for r, tok, _, c in items]
        arrays = {"tokens": np.concatenate([np.asarray(t, np.int32) for _, t, _, _ in items]),
                  "parents": np.concatenate([np.asarray(p, np.int32) for _, _, p, _ in items])}
        try:
            h, a = self.call("verify", {"requests": reqs, "return": "logits" if logits else "argmax"}, arrays)
        except WorkerError as e:
            return Timed(None, time.perf_counter() - t0, "soft", f"{e.code}: {e.message}", {"code": e.code})
        except (TimeoutError, OSError) as e:
            return Timed(None, time.perf_counter() - t0, "dead", f"verifier {self.name} did not answer: {e}")
        out, off = {}, 0
        for rid, tok, _, _ in items:
            n = len(tok)
            out[rid] = (np.asarray(a["argmax"][off:off + n]),
                        np.asarray(a["logits"][off:off + n]) if logits else None)
            off += n
        return Timed(out, time.perf_counter() - t0)

    @told
    def release(self, rids: list[str]) -> None:
        if rids:
            try:
                self.call("release", {"rids": list(rids)})
            except (WorkerError, TimeoutError, OSError) as e:
                log.warning("release on verifier %s failed: %s", self.name, e)

    def probe(self, timeout_s: float, rids: list[str]) -> bool:
        """Health check of a verifier marked dead; on success it also frees ``rids`` (the
        requests parked off it: had it only been slow, it would still hold their caches,
        and they are about to be prefilled again). Messages on one connection are handled
        in order, so the release comes before any new prefill."""
        try:
            self.call("health", {}, timeout_s=timeout_s)
            if rids:
                self.call("release", {"rids": list(rids)}, timeout_s=timeout_s)
        except (WorkerError, TimeoutError, OSError):
            return False
        return True


class DrafterProxy(WorkerProxy):
    """Drafter worker plus a mirror of what its cache holds for each request."""

    def __init__(self, name: str, endpoint: str, timeout_s: float, curve: CurveKeys | None = None,
                 context_window: int = 0, connect: Callable[[], Connection] | None = None):
        super().__init__(name, endpoint, timeout_s, curve, connect)
        self.cached: dict[str, list[int]] = {}  # rid -> tokens in the worker's cache
        # A drafter only proposes, so it may see just the last ``context_window`` prompt
        # tokens (0 = all): its prompt prefill then costs a fixed amount however long the
        # prompt. ``start[rid]`` is where in the request's context its cache begins.
        self.context_window = context_window
        self.start: dict[str, int] = {}
        # Requests the worker may hold although the mirror says nothing: the ones of a call
        # that timed out or failed in transport. Their messages may still arrive (a link that
        # comes back delivers what was queued), so they are released when a probe succeeds.
        self.unsure: set[str] = set()

    def draft(self, jobs: list[DraftJob]) -> Timed:
        """One draft op for all jobs (after a prefill op for requests new to this worker)."""
        t0 = time.perf_counter()
        try:
            prefill_tokens = self._prefill_new([(j.rid, j.context) for j in jobs])
            prefill_s = time.perf_counter() - t0 if prefill_tokens else 0.0
            reqs, feed = [], []
            for j in jobs:
                keep, f = plan_feed(self.cached[j.rid], j.context[self.start.get(j.rid, 0):])
                reqs.append({"rid": j.rid, "keep": keep, "n_feed": len(f), "k": j.k, "topk": j.topk,
                             "temperature": j.temperature, "return_probs": j.return_probs, "seed": j.seed,
                             **({"forced": j.forced} if j.forced is not None else {}),
                             **({"min_reach": j.min_reach} if j.min_reach is not None else {})})
                feed.extend(f)
            h, a = self.call("draft", {"requests": reqs}, {"feed": np.asarray(feed, dtype=np.int32)})
        except (WorkerError, TimeoutError, OSError) as e:
            return self._failed(e, [j.rid for j in jobs], t0)
        out: dict[str, DraftOut] = {}
        off = 0
        for j, rep in zip(jobs, h["requests"]):
            k = j.k
            toks = [int(t) for t in a["tokens"][off:off + k]]
            # A weight-free drafter (prompt lookup) marks "nothing to propose" with -1: the
            # draft ends there, and its worker appended only the tokens before it. A model
            # drafter whose chain stopped early (min_reach) pads with -1 too and reports the
            # steps it drafted as "k": it fed all but the last of them.
            n = toks.index(-1) if -1 in toks else k
            fed = min(n, int(rep.get("k", k)) - 1)
            self.cached[j.rid] = list(j.context[self.start.get(j.rid, 0):]) + toks[:fed]
            if n:
                sl = slice(off, off + n)
                out[j.rid] = DraftOut(tokens=toks[:n], probs=[float(p) for p in a["token_probs"][sl]],
                                      topk_ids=np.asarray(a["topk_ids"][sl]), topk_probs=np.asarray(a["topk_probs"][sl]),
                                      dists=np.asarray(a["probs"][sl]) if j.return_probs and "probs" in a else None)
            off += k
        dt = time.perf_counter() - t0
        # the prompt prefill is paid once per request: speculation control must not count it
        # as the cost of drafting
        return Timed(out, dt, extra={"prefill_s": prefill_s, "prefill_tokens": prefill_tokens})

    def _prefill_new(self, items: list[tuple[str, list[int]]]) -> int:
        """Prefill op for the requests new to this worker (all of ``context`` but its root,
        which the next draft op feeds); returns the prompt tokens prefilled."""
        new = [(rid, ctx) for rid, ctx in items if rid not in self.cached]
        if not new:
            return 0
        w = self.context_window
        for rid, ctx in new:
            self.start[rid] = max(0, len(ctx) - w) if w else 0
        pre = [(rid, ctx[self.start[rid]:-1]) for rid, ctx in new]
        toks = np.asarray([t for _, ts in pre for t in ts], dtype=np.int32)
        self.call("prefill", {"requests": [{"rid": r, "n": len(ts)} for r, ts in pre]}, {"tokens": toks})
        for r, ts in pre:
            self.cached[r] = list(ts)
        return int(toks.size)

    def warm(self, items: list[tuple[str, list[int]]]) -> Timed:
        """Prefill these requests' contexts now, ahead of their first draft op: the
        controller runs it while the target verifies, so the prompt prefill leaves the
        critical path (docs/algorithms.md, "Background drafter prefill")."""
        t0 = time.perf_counter()
        try:
            n = self._prefill_new(items)
        except (WorkerError, TimeoutError, OSError) as e:
            return self._failed(e, [rid for rid, _ in items], t0)
        return Timed(n, time.perf_counter() - t0)  # value: prompt tokens prefilled

    def _failed(self, e: Exception, rids: list[str], t0: float) -> Timed:
        dt = time.perf_counter() - t0
        if isinstance(e, WorkerError) and e.code in SOFT_CODES:
            # The batch failed as a whole and changed nothing on the worker, but our mirror
            # may be stale (worker restarted or freed idle requests): drop those requests
            # there and here, so they are prefilled afresh next time.
            self._forget(rids)
            return Timed(None, dt, "soft", f"{e.code}: {e.message}", {"code": e.code})
        # The worker itself is broken or silent: unknown state, so treat it as empty when
        # it is back.
        self._lose_track(rids)
        why = f"failed: {e.code}: {e.message}" if isinstance(e, WorkerError) else f"did not answer: {e}"
        return Timed(None, dt, "dead", f"drafter {self.name} {why}")

    def _lose_track(self, rids: Iterable[str]) -> None:
        self.unsure.update(self.cached)
        self.unsure.update(rids)
        self.cached.clear()

    def _forget(self, rids: list[str]) -> None:
        for r in rids:
            self.cached.pop(r, None)
            self.start.pop(r, None)
        try:
            self.call("release", {"rids": list(rids)})
        except (WorkerError, TimeoutError, OSError):
            pass

    @told
    def release(self, rids: list[str]) -> None:
        mine = [r for r in rids if r in self.cached]
        for r in mine:
            del self.cached[r]
        for r in rids:
            self.start.pop(r, None)
        if mine:
            try:
                self.call("release", {"rids": mine})
            except (WorkerError, TimeoutError, OSError) as e:
                log.warning("release on drafter %s failed: %s", self.name, e)

    def probe(self, timeout_s: float) -> bool:
        """Health check of a drafter marked dead. On success its cache counts as empty."""
        try:
            self.call("health", {}, timeout_s=timeout_s)
        except (WorkerError, TimeoutError, OSError):
            return False
        # It may only have been slow, or its link may have come back and delivered queued
        # prefill/draft messages: free everything it may still hold (unknown rids are fine).
        # Messages on one connection are handled in order, so this comes after them.
        stale = sorted(set(self.cached) | self.unsure)
        self.cached.clear()
        if stale:
            try:
                self.call("release", {"rids": stale}, timeout_s=timeout_s)
            except (WorkerError, TimeoutError, OSError):
                return False
        self.unsure.clear()
        return True
