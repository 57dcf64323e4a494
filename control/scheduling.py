"""The scheduling phase: which requests verify this round and which draft meanwhile.

``select_batch`` is the pure greedy choice under the round's caps, ranked by the profiled
cost model (control/costs.py; formulas in docs/algorithms.md, "Batch scheduling");
``Scheduler`` splits the requests into the round's groups (pipelining).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Mapping, Sequence

from cosine.config import Config

from .costs import CostBook, CostModel
from .drafting.trees import Draft
from .request import Mode, Request
from .speculation import DraftPlan


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


@dataclass
class RoundBatch:
    """Who does what this round."""

    draft_first: list[Request] = field(default_factory=list)  # drafted now, verified right after
    verify: list[Request] = field(default_factory=list)       # verified this round (their trees)
    alongside: list[Request] = field(default_factory=list)    # pipelined: drafting while the verifier works
    held_back: int = 0                                        # pipelined requests left to draft next round


class Scheduler:
    def __init__(self, cfg: Config, costs: CostBook, pipelined: bool, n_drafters: int, verifiers: Sequence[str]):
        self.cfg, self.costs = cfg, costs
        self.pipelined = pipelined
        self.n_drafters = n_drafters
        self.n_verifiers = len(verifiers)
        self.kv_budget = sum(cfg.worker(n).kv_budget_tokens for n in verifiers)

    def schedule(self, reqs: list[Request], waiting: Mapping[str, Draft], plans: dict[str, DraftPlan]) -> RoundBatch:
        """Pipelined cosine requests alternate: those holding a tree (``waiting``) verify
        while the others draft. A cosine request that does not speculate this round (no
        live drafter, speculation switched off) is verified right away like the
        sequential modes, which draft right before they verify."""
        pipelined = [r for r in reqs if self.pipelined and r.params.mode is Mode.COSINE
                     and (r.rid in waiting or plans[r.rid].speculate)]
        sequential = [r for r in reqs if r not in pipelined]
        candidates = [r for r in pipelined if r.rid in waiting] + sequential
        chosen = self.choose(candidates, waiting, plans)
        out = RoundBatch(draft_first=[r for r in sequential if r.rid in chosen],
                         verify=[r for r in candidates if r.rid in chosen])
        # Balance the groups: when far more requests wait to draft than to verify, hold
        # some back a round.
        to_draft = [r for r in pipelined if r.rid not in waiting]
        out.held_back = max(0, (len(to_draft) - len(out.verify)) // 2) if len(to_draft) > 1 else 0
        out.alongside = to_draft[:len(to_draft) - out.held_back]
        return out

    def choose(self, cands: list[Request], waiting: Mapping[str, Draft], plans: dict[str, DraftPlan]) -> set[str]:
        """The candidates that verify this round (``select_batch`` under the round's caps);
        never none: the oldest request always goes."""
        if not cands:
            return set()
        now = time.monotonic()
        pool = []
        for r in cands:
            d = waiting.get(r.rid)
            planned = d.tree.n if d is not None else 1 + (plans[r.rid].draft_len if r.rid in plans else 0) * \
                max(1, self.n_drafters if r.params.mode is Mode.SPECINFER else 1)
            pool.append(PendingRequest(rid=r.rid, seq_len=len(r.committed), planned_tokens=planned,
                                       waiting_s=now - r.wait_since, cache_tokens=len(r.committed) + planned))
        sch = self.cfg.controller.scheduling
        n = self.n_verifiers
        chosen = select_batch(pool, self.costs.profile, max_batch=sch.max_batch * n,
                              max_verify_tokens=sch.max_verify_tokens * n, memory_budget_tokens=self.kv_budget,
                              latency_weight=sch.latency_weight,
                              latency_bound_s=sch.latency_bound_ms / 1000.0 if sch.latency_bound_ms else None)
        ids = set(chosen)
        if not ids:  # never starve: the oldest request always goes
            ids = {max(pool, key=lambda p: p.waiting_s).rid}
        return ids
