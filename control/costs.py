"""The cost book: every cost the controller prices a round with, in one place.

Three sources, each the right one for its question (docs/algorithms.md, "Adaptive
speculation control" and "Batch-level speculation gate"):

- ``profile``: a linear model of verify and draft calls fitted at start-up (`cosine-serve`
  times a few calls on a dummy request); the scheduler ranks requests with it and the
  batch gate falls back on it before anything is measured;
- ``verify_calls``: whole verify calls measured on every round, time on the call's total
  tree tokens (what batching and contention cost, which the profile of one request misses):
  the batch gate's plain and speculative round;
- ``verify_trees``: a request's share of its call on its own tree size, from speculative
  rounds and plain steps: speculation control's draft length and gain floors;

and three running averages: a plain target step, a draft step (over all requests; each
request keeps its own in the speculation controller), and a model drafter's prompt prefill
per token. Pure: nothing here does I/O.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
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


def ewma(old: float | None, new: float, keep: float) -> float:
    return new if old is None else keep * old + (1.0 - keep) * new


class VerifyFit:
    """Exponentially weighted least squares of verify time on tree size n:
    t(n) = a + b*n. Shared by all requests: it is a property of the verifier."""

    def __init__(self, decay: float):
        self.decay = decay
        self.w = self.sn = self.st = self.snn = self.snt = 0.0

    def add(self, n: float, t: float) -> None:
        d = self.decay
        self.w = d * self.w + 1.0
        self.sn = d * self.sn + n
        self.st = d * self.st + t
        self.snn = d * self.snn + n * n
        self.snt = d * self.snt + n * t

    def spread(self) -> float:
        """Weighted variance of the sizes seen: 0 until two different sizes were measured."""
        if self.w == 0.0:
            return 0.0
        mn = self.sn / self.w
        return max(0.0, self.snn / self.w - mn * mn)

    def predict(self, n: float, token_frac: float) -> float | None:
        if self.w == 0.0:
            return None
        mn, mt = self.sn / self.w, self.st / self.w
        var = self.snn / self.w - mn * mn
        if var > 1e-6 * max(1.0, mn * mn):
            b = max(0.0, (self.snt / self.w - mn * mt) / var)
        else:
            # One tree size seen so far: assume each extra token costs token_frac of the mean.
            b = token_frac * mt / max(mn, 1.0)
        a = max(0.0, mt - b * mn)
        return a + b * n


@dataclass
class CostBook:
    """The controller's costs (see the module docstring). ``keep`` is the weight of the
    old value in the running averages."""

    profile: CostModel = field(default_factory=CostModel.default)
    verify_calls: VerifyFit = field(default_factory=lambda: VerifyFit(0.9))
    verify_trees: VerifyFit = field(default_factory=lambda: VerifyFit(0.95))
    token_frac: float = 0.05           # before two tree sizes were seen: one more token costs this share
    keep: float = 0.5
    plain_step_s: float | None = None  # a one-token target step (EMA)
    draft_step_s: float | None = None  # one draft step of a speculative round, over all requests (EMA)
    # A model drafter's prompt prefill, seconds per prompt token (EMA): what a request that
    # never drafted costs before its first speculative round. The batch gate charges
    # 1/probe_every of it per round (speculation must last about that long to repay it).
    prefill_token_s: float | None = None

    def tree_verify_s(self, n_tokens: int) -> float:
        """Predicted verify time of one request's n-token tree (0 before any measurement)."""
        t = self.verify_trees.predict(n_tokens, self.token_frac)
        if t is None and self.plain_step_s is not None:
            t = self.plain_step_s * (1.0 + self.token_frac * (n_tokens - 1))
        return t or 0.0

    def call_verify_s(self, n_tokens: float) -> float:
        """Measured verify time of a whole call of ``n_tokens`` tree tokens (0 before any)."""
        return self.verify_calls.predict(n_tokens, 0.0) or 0.0

    def calls_measured(self) -> bool:
        """Have plain and speculative calls both been seen (so the call line has a slope)?"""
        return self.verify_calls.spread() > 0.25

    def observe_call(self, n_tokens: float, seconds: float) -> None:
        if seconds > 0:
            self.verify_calls.add(float(n_tokens), seconds)

    def observe_plain_step(self, seconds: float) -> None:
        if seconds > 0:
            self.plain_step_s = ewma(self.plain_step_s, float(seconds), self.keep)
            self.verify_trees.add(1.0, float(seconds))

    def observe_tree(self, n_tokens: float, seconds: float) -> None:
        self.verify_trees.add(float(n_tokens), seconds)

    def observe_draft_step(self, seconds: float) -> None:
        self.draft_step_s = ewma(self.draft_step_s, seconds, self.keep)

    def observe_prefill(self, seconds: float, tokens: int) -> None:
        if tokens > 0:
            self.prefill_token_s = ewma(self.prefill_token_s, seconds / tokens, 0.5)
