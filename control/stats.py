"""The controller's counters: what each phase adds up, and what one round took.

The phases count into one ``ControllerStats`` (the commit phase most of it); the serve
`stats` op reports them (ControlCore.stats). Its ``metrics`` (control/metrics.py) are the
counters `cosine-http` exposes at /metrics: drafts and accepted tokens per mode and
drafter, router picks, fused-step wins, worker deaths, TTFT/ITL/end-to-end histograms.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

from .metrics import ServeMetrics


@dataclass
class RoundClock:
    """One round's phases, perf_counter seconds: when each started and how long it took."""

    start: float = field(default_factory=time.perf_counter)
    tokens_before: int = 0
    first_at: float = 0.0     # drafting of the requests verified right after
    first_s: float = 0.0
    verify_at: float = 0.0
    verify_s: float = 0.0     # the verifiers' busy time
    along_at: float = 0.0     # pipelined drafting while the verifier works
    along_s: float = 0.0

    def elapsed(self) -> float:
        return time.perf_counter() - self.start


@dataclass
class ControllerStats:
    started: float = field(default_factory=time.monotonic)
    ticks: int = 0                   # rounds of the controller (each verifies one or more requests)
    rounds: int = 0                  # request rounds verified (a tick of B requests counts B)
    tokens: int = 0
    accepted_drafts: int = 0
    requests_done: int = 0
    requests_failed: int = 0
    queue_waits: int = 0             # requests that had to wait in the queue for KV room
    wall_s: float = 0.0              # time spent inside ticks with work
    verify_busy_s: float = 0.0
    draft_wall_s: float = 0.0
    overlap_s: float = 0.0
    gated_rounds: int = 0            # rounds where plain batched decoding beat speculation
    pruned_nodes: int = 0            # drafted tree nodes dropped as not worth verifying
    inexact_pruned: int = 0          # greedy tree nodes dropped: no exact key slot (cosine/keyslots.py)
    background_prefills: int = 0     # request prompts a model drafter prefilled off the critical path
    guided_steps: int = 0            # model-drafter proposals read off a scored guide (no forward of their own)
    stopped_chains: int = 0          # solo model-drafter chains the drafter ended early (min_reach)
    refused_drafts: int = 0          # draft batches a drafter refused (its cache mirror was stale, ...)
    rescued_rounds: int = 0          # routed rounds with no proposal that a spare model drafter drafted
    resumed_requests: int = 0        # requests prefilled again after their verifier died or lost them
    last_round: dict = field(default_factory=dict)
    metrics: ServeMetrics = field(default_factory=lambda: ServeMetrics([]))  # the core names the drafters
    # The last rounds' phases, seconds since start: (sequential draft start, end, verify
    # start, end, pipelined draft start, end, requests verified, requests drafted);
    # `stats` with timeline=N returns them (cosine-bench plots the overlap).
    timeline: deque = field(default_factory=lambda: deque(maxlen=4096))

    def record(self, c: RoundClock, origin: float, verified: int, drafted: int, held_back: int,
               actor_wait_s: dict[str, float]) -> float:
        """Add up one round; returns its wall time."""
        wall = c.elapsed()
        self.ticks += 1
        self.wall_s += wall
        self.verify_busy_s += c.verify_s
        self.draft_wall_s += c.first_s + c.along_s
        # drafting that ran while the verifier was busy: what pipelining saved this round
        self.overlap_s += max(0.0, min(c.along_s, c.verify_s))
        at = lambda t: round(t - origin, 6)  # noqa: E731
        self.timeline.append((at(c.first_at), at(c.first_at + c.first_s), at(c.verify_at),
                              at(c.verify_at + c.verify_s), at(c.along_at), at(c.along_at + c.along_s),
                              verified, drafted))
        self.last_round = {"wall_s": wall, "verify_s": c.verify_s, "draft_s": c.first_s + c.along_s,
                           "verified": verified, "drafted": drafted, "held_back": held_back,
                           "verifier_idle_frac": max(0.0, 1.0 - c.verify_s / max(wall, 1e-9)),
                           "actor_wait_s": actor_wait_s}
        return wall
