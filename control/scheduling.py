"""Batch scheduling: the greedy choice of which pending requests verify in the next round,
ranked by the profiled cost model (control/costs.py). Formulas: docs/algorithms.md,
"Batch scheduling". The planning phase (control/planning.py, ``Scheduler``) calls it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .costs import CostModel


@dataclass(frozen=True)
class PendingRequest:
    rid: str
    seq_len: int
    planned_tokens: int     # tokens this request adds to the verify call (root + tree)
    waiting_s: float        # since it became ready to verify
    cache_tokens: int       # KV cache tokens it will hold after this round


def select_batch(pool: Sequence[PendingRequest], cost: CostModel, max_batch: int, max_verify_tokens: int,
                 memory_budget_tokens: int, latency_weight: float,
                 latency_bound_s: float | None = 0.0) -> list[str]:
    """Greedy: order requests, then take each one that still fits every cap.

    Order: requests waiting longer than latency_bound_s (when > 0) first, longest wait
    first; then the rest by latency_weight * wait/max_wait + (1 - latency_weight) *
    tput/max_tput, where tput = planned_tokens / marginal verify cost. Ties by rid.
    Caps: at most max_batch requests, sum(planned_tokens) <= max_verify_tokens,
    sum(cache_tokens) <= memory_budget_tokens. Returns rids in the chosen order; empty
    only when no request fits alone.
    """
    if not 0.0 <= latency_weight <= 1.0:
        raise ValueError(f"select_batch: latency_weight must be in [0, 1], got {latency_weight}")
    seen: set[str] = set()
    reqs = [p for p in pool if not (p.rid in seen or seen.add(p.rid))]
    if max_batch < 1 or not reqs:
        return []
    bound = latency_bound_s or 0.0

    # Marginal verify cost of one more request: its share of the per-token and
    # per-sequence terms (the constant is paid once per call whoever joins).
    base = cost.verify_s(0, 0, 0)
    tput = {p.rid: max(p.planned_tokens, 0) / max(cost.verify_s(1, p.planned_tokens, p.seq_len) - base, 1e-12)
            for p in reqs}
    max_wait = max(max(p.waiting_s for p in reqs), 0.0)
    max_tput = max(tput.values())

    def score(p: PendingRequest) -> float:
        w = p.waiting_s / max_wait if max_wait > 0 else 0.0
        t = tput[p.rid] / max_tput if max_tput > 0 else 0.0
        return latency_weight * w + (1.0 - latency_weight) * t

    urgent = sorted((p for p in reqs if bound > 0 and p.waiting_s > bound), key=lambda p: (-p.waiting_s, p.rid))
    urgent_ids = {p.rid for p in urgent}
    rest = sorted((p for p in reqs if p.rid not in urgent_ids), key=lambda p: (-score(p), p.rid))

    chosen: list[str] = []
    tokens = memory = 0
    for p in urgent + rest:
        if len(chosen) >= max_batch:
            break
        if tokens + p.planned_tokens <= max_verify_tokens and memory + p.cache_tokens <= memory_budget_tokens:
            chosen.append(p.rid)
            tokens += p.planned_tokens
            memory += p.cache_tokens
    return chosen
