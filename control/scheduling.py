"""Batch scheduling: profiled linear cost models and the greedy choice of which pending
requests verify in the next round. Formulas: docs/algorithms.md, "Batch scheduling"."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

Coef = tuple[float, float, float]  # (constant, per batch*tokens, per batch*seq_len), seconds


def _nnls3(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Non-negative least squares for a handful of features, exactly: the NNLS optimum is
    the unconstrained least-squares fit on its own support, so try every support (2^3 here)
    with numpy.linalg.lstsq and keep the best feasible one. Ties (collinear features, few
    samples) go to the smaller support, then to the one listed first (constant first)."""
    n_feat = x.shape[1]
    best, best_key = np.zeros(n_feat), (float(np.sum(y * y)), 0, ())
    tol = 1e-12 * max(1.0, best_key[0])
    for size in range(1, n_feat + 1):
        for support in itertools.combinations(range(n_feat), size):
            sol, *_ = np.linalg.lstsq(x[:, support], y, rcond=None)
            if np.any(sol < 0):
                continue
            coef = np.zeros(n_feat)
            coef[list(support)] = sol
            res = float(np.sum((x @ coef - y) ** 2))
            if res < best_key[0] - tol:
                best, best_key = coef, (res, size, support)
    return best


def _fit(samples: Sequence[tuple[float, float, float, float]], default: Coef) -> Coef:
    if not samples:
        return default
    a = np.asarray(samples, dtype=np.float64).reshape(-1, 4)
    batch, work, seq, secs = a.T
    x = np.stack([np.ones_like(batch), batch * work, batch * seq], axis=1)
    c = _nnls3(x, np.maximum(secs, 0.0))
    return (float(c[0]), float(c[1]), float(c[2]))


def _predict(c: Coef, batch: float, work: float, seq_len: float) -> float:
    return max(0.0, c[0] + c[1] * batch * work + c[2] * batch * seq_len)


@dataclass
class CostModel:
    """t = c0 + c1*batch*tokens + c2*batch*seq_len for a verify call (tokens: tree nodes
    per request, seq_len: longest sequence) and likewise for a draft call (steps)."""
    verify_coef: Coef = (0.02, 5e-4, 1e-6)
    draft_coef: Coef = (1e-3, 5e-3, 1e-7)

    def verify_s(self, batch: int, tokens: int, seq_len: int) -> float:
        return _predict(self.verify_coef, batch, tokens, seq_len)

    def draft_s(self, batch: int, steps: int, seq_len: int) -> float:
        return _predict(self.draft_coef, batch, steps, seq_len)

    @classmethod
    def default(cls) -> "CostModel":
        """Placeholder shape (a mostly flat verify, a per-step draft) for when no profile
        exists; only ratios matter to select_batch, so rough magnitudes are fine."""
        return cls()

    @classmethod
    def fit(cls, samples_verify: Sequence[tuple[int, int, int, float]],
            samples_draft: Sequence[tuple[int, int, int, float]]) -> "CostModel":
        """Least squares with non-negative coefficients over [1, batch*tokens, batch*seq_len].
        Samples are (batch, tokens, seq_len, seconds) and (batch, steps, seq_len, seconds);
        a model without samples keeps the default."""
        d = cls.default()
        return cls(_fit(samples_verify, d.verify_coef), _fit(samples_draft, d.draft_coef))


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
