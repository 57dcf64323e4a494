"""Serve-side counters for monitoring: what `cosine-http` exposes at /metrics (docs/http.md).

Pure bookkeeping, no actors or sockets: the controller calls the ``on_*`` methods where
things happen, and ``snapshot()`` (a plain dict, part of the `stats` op's reply) is the
only thing the gateway reads. Every counter is counted here once; the gateway maps it to
Prometheus and computes nothing itself.

The spec-decode counters keep vLLM's meanings, per (mode, drafter):
  num_drafts            rounds in which the drafter proposed at least one verified node
  num_draft_tokens      tree nodes it proposed that went to verification
  num_accepted_tokens   of those, the ones the target accepted
  accepted_per_pos      accepted nodes by position on the accepted path (0 = first draft token)
A fused round with several drafters counts once for each of them in num_drafts; the
per-mode count of drafted rounds is ``num_trees`` (each round verifies one token tree).

Per request (``on_finish`` returns them for the `done` reply): num_drafts, num_draft_tokens,
num_accepted_tokens, draft_acceptance_rate = accepted / draft tokens and, as in vLLM,
mean_acceptance_length = 1 + accepted / num_drafts (rounds without a draft left out).
"""

from __future__ import annotations

import bisect
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any, Sequence

# vLLM's bucket bounds (seconds), so dashboards built for it read these the same way.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class Histogram:
    """Counts per bucket (upper bounds, +Inf implied), sum and count."""

    def __init__(self, bounds: Sequence[float]):
        self.bounds = tuple(float(b) for b in bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, x: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, x)] += 1
        self.sum += x

    def snapshot(self) -> dict[str, Any]:
        """Cumulative counts as Prometheus wants them: [[upper bound, count <= it], ...]."""
        cum, out = 0, []
        for b, c in zip(self.bounds + (float("inf"),), self.counts):
            cum += c
            out.append([b, cum])
        return {"buckets": out, "sum": self.sum, "count": cum}


@dataclass
class _Live:
    """What one admitted request has counted so far."""

    mode: str
    arrived: float
    prompt_tokens: int
    last_token_at: float | None = None
    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0


@dataclass
class _Spec:
    """Spec-decode counters of one (mode, drafter)."""

    num_drafts: int = 0
    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    accepted_per_pos: Counter = field(default_factory=Counter)


class ServeMetrics:
    """Counters, gauges' inputs and histograms of one cosine-serve process."""

    def __init__(self, drafter_names: Sequence[str]):
        self.names = list(drafter_names)  # a tree node's proposer index -> drafter name
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.finished: Counter = Counter()     # finish reason (eos, stop, length) -> requests
        self.failed: Counter = Counter()       # error code (cancelled, timeout, overloaded, ...) -> requests
        self.ttft = Histogram(TTFT_BUCKETS)
        self.itl = Histogram(ITL_BUCKETS)
        self.e2e = Histogram(E2E_BUCKETS)
        self.spec: dict[tuple[str, str], _Spec] = defaultdict(_Spec)
        self.trees: Counter = Counter()        # mode -> rounds that verified at least one draft token
        self.router_picks: Counter = Counter()  # drafter -> times the router picked it for a request's round
        self.fused_wins: Counter = Counter()    # drafter -> fused draft steps its token won
        self.deaths: Counter = Counter()        # worker -> times serve saw it stop answering
        self.restarts: Counter = Counter()      # worker -> times a worker seen dead answered again
        self._down: set[str] = set()
        self._live: dict[str, _Live] = {}

    # -- request life -----------------------------------------------------------------
    def on_admit(self, rid: str, mode: str, prompt_tokens: int, arrived: float) -> None:
        """The request's prompt was prefilled: it now runs."""
        self.prompt_tokens += prompt_tokens
        self._live[rid] = _Live(mode, arrived, prompt_tokens)

    def on_round(self, rid: str, proposers: Sequence[int], accepted_nodes: Sequence[int], new_tokens: int,
                 now: float | None = None) -> None:
        """One verified round: the tree's proposer per node (node 0 the root), the accepted
        path's nodes (root first) and the output tokens the round committed."""
        live = self._live.get(rid)
        if live is None:
            return
        now = time.monotonic() if now is None else now
        self.generation_tokens += new_tokens
        if new_tokens:
            if live.last_token_at is None:
                self.ttft.observe(now - live.arrived)
            else:  # as vLLM: one observation per step that produced tokens
                self.itl.observe(now - live.last_token_at)
            live.last_token_at = now
        drafted = [self.names[int(p)] for p in proposers[1:]]
        if not drafted:
            return
        accepted = [self.names[int(proposers[n])] for n in accepted_nodes[1:]]
        live.num_drafts += 1
        live.num_draft_tokens += len(drafted)
        live.num_accepted_tokens += len(accepted)
        self.trees[live.mode] += 1
        for name, n in Counter(drafted).items():
            s = self.spec[(live.mode, name)]
            s.num_drafts += 1
            s.num_draft_tokens += n
        for pos, name in enumerate(accepted):
            s = self.spec[(live.mode, name)]
            s.num_accepted_tokens += 1
            s.accepted_per_pos[pos] += 1

    def on_finish(self, rid: str, reason: str, now: float | None = None) -> dict[str, Any]:
        """A request ended normally; returns its speculation figures for the `done` reply."""
        self.finished[reason] += 1
        live = self._live.pop(rid, None)
        if live is None:
            return {}
        self.e2e.observe((time.monotonic() if now is None else now) - live.arrived)
        return {
            "prompt_tokens": live.prompt_tokens, "num_drafts": live.num_drafts,
            "num_draft_tokens": live.num_draft_tokens, "num_accepted_tokens": live.num_accepted_tokens,
            "draft_acceptance_rate": (live.num_accepted_tokens / live.num_draft_tokens
                                      if live.num_draft_tokens else None),
            "mean_acceptance_length": (1.0 + live.num_accepted_tokens / live.num_drafts
                                       if live.num_drafts else None),
        }

    def on_error(self, code: str) -> None:
        """A request got an error reply (rejected, cancelled, timed out, failed)."""
        self.failed[code] += 1

    def forget(self, rid: str) -> None:
        """The request is gone (finished or failed): drop what is kept for it."""
        self._live.pop(rid, None)

    # -- routing, fusion, workers ---------------------------------------------------------
    def on_picks(self, picks: dict[str, Sequence[str]]) -> None:
        """The router's drafters per request for one round."""
        for names in picks.values():
            self.router_picks.update(names)

    def on_fused_win(self, proposer: int) -> None:
        """A fused draft step took this drafter's token."""
        self.fused_wins[self.names[proposer]] += 1

    def on_worker(self, name: str, alive: bool) -> None:
        """What a call to the worker showed; counts the changes between up and down."""
        if not alive and name not in self._down:
            self._down.add(name)
            self.deaths[name] += 1
        elif alive and name in self._down:
            self._down.discard(name)
            self.restarts[name] += 1

    # -- reading ----------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        spec = [{"mode": m, "drafter": d, "num_drafts": s.num_drafts, "num_draft_tokens": s.num_draft_tokens,
                 "num_accepted_tokens": s.num_accepted_tokens,
                 "accepted_per_pos": [s.accepted_per_pos[i] for i in range(max(s.accepted_per_pos, default=-1) + 1)]}
                for (m, d), s in sorted(self.spec.items())]
        return {
            "prompt_tokens": self.prompt_tokens, "generation_tokens": self.generation_tokens,
            "requests_finished": dict(self.finished), "requests_failed": dict(self.failed),
            "time_to_first_token_s": self.ttft.snapshot(), "inter_token_latency_s": self.itl.snapshot(),
            "e2e_request_latency_s": self.e2e.snapshot(),
            "spec_decode": spec, "num_trees": dict(self.trees),
            "router_picks": dict(self.router_picks), "fused_wins": dict(self.fused_wins),
            "worker_deaths": dict(self.deaths), "worker_restarts": dict(self.restarts),
            "workers_down": sorted(self._down),
        }
