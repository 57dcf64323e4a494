"""How big each measurement step can be in the time left (tools/gpu/measure.py).

A time model per step, pure functions: the benchmark steps cost a cluster start plus their
tokens at the speed the worker step just measured (every mode priced as plain decoding,
which speculation should beat), plus the Hugging Face peers. The new-token budget is the
largest candidate that lets every remaining step fit; failing that, the largest that lets
the two main runs fit (the later steps are then skipped for time, saying so).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

SAFETY = 1.5  # estimates are rough: plan for half again as long
BENCH_STEPS = ("bench-c1", "bench-c16", "routing-2", "routing-3", "cuda-graph")
MAIN_STEPS = ("bench-c1", "bench-c16")
MODES = 4  # autoregressive, speculative, specinfer, cosine


@dataclass(frozen=True)
class Speeds:
    """What a step costs: measured by the worker step where it can be, else the profile's guess."""
    decode_b1_ms: float        # worker round trip of a batch-1 decode step
    decode_b16_ms: float       # ... of a batch-16 decode step
    overhead_ms: float         # control plane per round, beyond the worker's step
    cluster_start_s: float     # workers + serve up (engines loaded)
    hf_tok_s: float            # Hugging Face generate() / assisted, tokens per second
    peer_load_s: float         # loading the two peer models


@dataclass(frozen=True)
class Profile:
    name: str
    per_domain: int            # prompts per domain (4 domains) for every benchmark run
    peer_per_domain: int       # of those, the ones the Hugging Face peers generate for
    tokens: tuple[int, ...]    # new-token candidates, largest first
    worker_iters: int
    worker_prefix: int
    worker_prefill: int
    worker_s: float            # what the worker step takes
    guess: Speeds


GPU = Profile("gpu", per_domain=4, peer_per_domain=1, tokens=(128, 96, 64, 48, 32), worker_iters=40,
              worker_prefix=128, worker_prefill=128, worker_s=45.0,
              guess=Speeds(decode_b1_ms=10.0, decode_b16_ms=20.0, overhead_ms=4.0, cluster_start_s=30.0,
                           hf_tok_s=20.0, peer_load_s=25.0))
REHEARSAL = Profile("rehearsal", per_domain=1, peer_per_domain=1, tokens=(8,), worker_iters=5,
                    worker_prefix=32, worker_prefill=32, worker_s=30.0,
                    guess=Speeds(decode_b1_ms=3.0, decode_b16_ms=6.0, overhead_ms=40.0, cluster_start_s=15.0,
                                 hf_tok_s=50.0, peer_load_s=5.0))


def measured(p: Profile, worker: dict | None) -> Speeds:
    """The profile's speeds with the worker step's numbers (cosine-bench worker JSON) in."""
    if not worker:
        return p.guess
    dec = worker.get("decode") or {}
    b1 = (dec.get("1") or {}).get("rtt_ms_p50") or p.guess.decode_b1_ms
    b16 = (dec.get("16") or {}).get("rtt_ms_p50") or max(b1, p.guess.decode_b16_ms)
    start = (worker.get("timing") or {}).get("worker_start_s")
    return replace(p.guess, decode_b1_ms=float(b1), decode_b16_ms=float(b16),
                   cluster_start_s=max(p.guess.cluster_start_s, 2.0 * start) if start else p.guess.cluster_start_s)


def estimate(step: str, tokens: int, p: Profile, s: Speeds) -> float:
    """Seconds a step should take (SAFETY included)."""
    if step == "worker":
        return p.worker_s
    n = 4 * p.per_domain
    c1 = n * tokens * (s.decode_b1_ms + s.overhead_ms) / 1e3           # one mode, concurrency 1
    c16 = math.ceil(n / 16) * tokens * (s.decode_b16_ms + s.overhead_ms) / 1e3  # one mode, waves of 16
    work = {"bench-c1": MODES * c1 + s.peer_load_s + 2 * 4 * p.peer_per_domain * tokens / s.hf_tok_s,
            "bench-c16": MODES * c16,
            "routing-2": c1 + c16, "routing-3": c1 + c16,
            "cuda-graph": 2 * (c1 + c16)}[step]
    return SAFETY * (s.cluster_start_s + work)


def choose_tokens(remaining_s: float, steps: tuple[str, ...], p: Profile, s: Speeds) -> int:
    """The largest candidate that fits every step in ``steps``; else the largest that fits
    the main runs among them; else the smallest."""
    for group in (steps, tuple(x for x in steps if x in MAIN_STEPS)):
        for t in p.tokens:
            if sum(estimate(x, t, p, s) for x in group) <= remaining_s:
                return t
    return min(p.tokens)


def timeout(step: str, tokens: int, remaining_s: float, p: Profile, s: Speeds) -> float:
    """A step may run up to twice its estimate (at least a minute over it), never past the budget."""
    est = estimate(step, tokens, p, s)
    return max(0.0, min(remaining_s, max(2 * est, est + 60)))
