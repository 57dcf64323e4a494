"""CoSine's drafter router: per-request drafter scores, exploit/explore selection, and
per-domain priors learned across requests.

The paper publishes no formulas; the ones here are cosine's named choices (see
docs/algorithms.md, "Routing"). Pure and deterministic: the only randomness is a
seeded numpy generator.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Collection, Sequence

import numpy as np

from cosine.config import RoutingConfig

from ..ports import told
from .domains import DomainClassifier, KeywordClassifier


ALL_DOMAINS = "*"  # the priors' key for a drafter's record over every domain


@dataclass(frozen=True)
class DrafterInfo:
    name: str
    domains: tuple[str, ...] = ()
    model: bool = False  # a neural drafter (it runs a forward per step); else weight-free


def harmonic_mean(a: float, b: float) -> float:
    """2ab/(a+b); 0 when either is 0, so a drafter must be both confident and right."""
    return 0.0 if a <= 0.0 or b <= 0.0 else 2.0 * a * b / (a + b)


def _unit(x: float) -> float:
    return min(1.0, max(0.0, float(x)))


@dataclass
class _Request:
    domain: str
    scores: dict[str, float]
    tried: set[str] = field(default_factory=set)
    window: deque = field(default_factory=deque)      # 1 + accepted, per round
    pending: int | None = None                        # best drafter match of an unrecorded round
    rounds: int = 0


class Router:
    """Keeps, for every live request, a score per drafter and picks the drafters of its
    next round. See docs/algorithms.md "Routing" for the formulas."""

    def __init__(self, drafters: Sequence[DrafterInfo], max_drafters: int = 2, ema: float = 0.5,
                 explore_threshold: float = 1.5, explore_prob: float = 0.0,
                 classifier: DomainClassifier | None = None, seed: int = 0, window: int = 4,
                 base_score: float = 0.5, domain_bonus: float = 0.25, prior_weight: float = 1.0,
                 min_score_ratio: float = 0.0, anchor_model: bool = False):
        names = [d.name for d in drafters]
        if len(set(names)) != len(names):
            raise ValueError(f"Router: drafter names must be unique, got {names}")
        if not 0.0 <= ema < 1.0:
            raise ValueError(f"Router: ema must be in [0, 1), got {ema}")
        if max_drafters < 1 or window < 1:
            raise ValueError("Router: max_drafters and window must be >= 1")
        self.drafters = list(drafters)
        self._order = {n: i for i, n in enumerate(names)}
        self.max_drafters = int(max_drafters)
        self.ema = float(ema)
        self.explore_threshold = float(explore_threshold)
        self.explore_prob = float(explore_prob)
        self.classifier: DomainClassifier = classifier if classifier is not None else KeywordClassifier()
        self.window = int(window)
        self.base_score = float(base_score)
        self.domain_bonus = float(domain_bonus)
        self.prior_weight = float(prior_weight)
        self.min_score_ratio = float(min_score_ratio)
        self.anchor_model = bool(anchor_model)
        self._model = {d.name for d in drafters if d.model}
        self.rng = np.random.default_rng(seed)
        self._reqs: dict[str, _Request] = {}
        # domain -> drafter -> [sum of final scores, number of requests folded in]
        self._prior_sums: dict[str, dict[str, list[float]]] = {}
        self.explorations = 0  # rounds in which select() explored (stats)

    @classmethod
    def from_config(cls, drafters: Sequence[DrafterInfo], cfg: RoutingConfig,
                    classifier: DomainClassifier | None = None, seed: int = 0, **kw) -> "Router":
        return cls(drafters, max_drafters=cfg.max_drafters_per_request, ema=cfg.ema,
                   explore_threshold=cfg.explore_threshold, explore_prob=cfg.explore_prob,
                   min_score_ratio=cfg.min_score_ratio, anchor_model=cfg.anchor_model, classifier=classifier,
                   seed=seed, **kw)

    # -- per-request lifecycle ---------------------------------------------------------
    def initial_score(self, domain: str, drafter: DrafterInfo) -> float:
        """The drafter's learned mean final score in this domain, shrunk towards its mean
        over all domains, itself shrunk towards the declared-domain base score: a drafter
        that proved itself everywhere starts high in a domain it has not met yet. A
        weight-free drafter declared for other domains skips the middle level."""
        base = self.base_score + (self.domain_bonus if domain in drafter.domains else 0.0)
        # A weight-free specialist's record elsewhere is its corpus's record on its own
        # domains: it says nothing about this domain's text (measured: the code n-gram,
        # high on code, was routed to prose requests ahead of the prose n-gram).
        foreign = not drafter.model and drafter.domains and domain not in drafter.domains
        s, n = (0.0, 0) if foreign else self._prior_sums.get(ALL_DOMAINS, {}).get(drafter.name, (0.0, 0))
        overall = (s + self.prior_weight * base) / (n + self.prior_weight)
        s, n = self._prior_sums.get(domain, {}).get(drafter.name, (0.0, 0))
        return (s + self.prior_weight * overall) / (n + self.prior_weight)

    def start(self, rid: str, prompt_text: str = "") -> str:
        """Classify the prompt and seed this request's scores from the domain's priors.
        Starting a rid again starts it afresh."""
        domain = self.classifier.classify(prompt_text)
        scores = {d.name: self.initial_score(domain, d) for d in self.drafters}
        self._reqs[rid] = _Request(domain, scores, window=deque(maxlen=self.window))
        return domain

    def finish(self, rid: str) -> None:
        """Fold the final scores of the drafters this request tried into the domain's
        priors (running mean), and forget the request. Unknown rids are ignored."""
        req = self._reqs.pop(rid, None)
        if req is None:
            return
        for dom in (req.domain, ALL_DOMAINS):
            sums = self._prior_sums.setdefault(dom, {})
            for name in req.tried:  # untried scores are just the prior again: no evidence
                acc = sums.setdefault(name, [0.0, 0])
                acc[0] += req.scores[name]
                acc[1] += 1

    def _req(self, rid: str, op: str) -> _Request:
        try:
            return self._reqs[rid]
        except KeyError:
            raise KeyError(f"Router.{op}: unknown request {rid!r}; call start(rid, prompt) first "
                           f"(or it was already finished)") from None

    # -- feedback ----------------------------------------------------------------------
    def update(self, rid: str, drafter: str, confidence: float, accepted: int, proposed: int) -> None:
        """score := ema*score + (1-ema)*harmonic_mean(confidence, accepted/proposed)."""
        req = self._req(rid, "update")
        if drafter not in req.scores:
            raise KeyError(f"Router.update: unknown drafter {drafter!r}; known: {list(req.scores)}")
        accuracy = _unit(accepted / proposed) if proposed > 0 else 0.0
        sample = harmonic_mean(_unit(confidence), accuracy)
        req.scores[drafter] = self.ema * req.scores[drafter] + (1.0 - self.ema) * sample
        req.tried.add(drafter)
        # If the caller never reports whole rounds, the best drafter's match stands in.
        req.pending = max(req.pending or 0, max(0, int(accepted)))

    def record_round(self, rid: str, accepted: int) -> None:
        """The request's accepted draft tokens in one round (its accepted length is 1 + that)."""
        req = self._req(rid, "record_round")
        req.window.append(1 + max(0, int(accepted)))
        req.pending = None
        req.rounds += 1

    # -- selection ---------------------------------------------------------------------
    def select(self, rid: str, available: Collection[str] | None = None, k: int | None = None,
               anchor: bool = True) -> list[str]:
        """Up to k drafters, best score first (ties: declaration order), from ``available``;
        with ``anchor_model`` (and ``anchor``: the caller may withhold it) the best model
        drafter first.

        Explores (swaps the last pick for an untried drafter, else a random unpicked one)
        when the mean accepted length over a full window is below explore_threshold (the
        window then restarts, so the new choice gets a window of evidence), or with
        probability explore_prob.
        """
        req = self._req(rid, "select")
        if req.pending is not None:
            self.record_round(rid, req.pending)
        k = self.max_drafters if k is None else int(k)
        names = [d.name for d in self.drafters if available is None or d.name in available]
        if k <= 0 or not names:
            return []
        ranked = sorted(names, key=lambda n: (-req.scores[n], self._order[n]))
        top = req.scores[ranked[0]]
        # Anchor: the best available model drafter always drafts; the scores pick the rest.
        lead = next((n for n in ranked if n in self._model), None) if self.anchor_model and anchor else None
        if lead is not None:
            ranked = [lead] + [n for n in ranked if n != lead]
        picks = ranked[:k]
        # A tried drafter far behind the best only costs fusion accepted length (its confident
        # misses win steps): the request runs on the better ones alone.
        picks = picks[:1] + [n for n in picks[1:] if n not in req.tried or req.scores[n] >= self.min_score_ratio * top]
        # Exploration candidates: unpicked drafters whose score (for an untried one: its
        # learned prior) is within min_score_ratio of the best. Once the priors show a
        # drafter is far behind on this domain, a hard stretch of text no longer makes
        # every request try it again.
        rest = [n for n in ranked if n not in picks and req.scores[n] >= self.min_score_ratio * top]
        if not rest:
            return picks
        low = len(req.window) == self.window and float(np.mean(req.window)) < self.explore_threshold
        lucky = self.rng.random() < self.explore_prob  # drawn every call: a stable random stream
        if (low or lucky) and (lead is None or k > 1):
            untried = [n for n in rest if n not in req.tried]
            choice = untried[0] if untried else rest[int(self.rng.integers(len(rest)))]
            if len(picks) < k:
                picks.append(choice)
            else:
                picks[-1] = choice
            self.explorations += 1
            if low:
                req.window.clear()
        return picks

    # -- batches: one message each to the router's actor -----------------------------------
    def select_many(self, asks: Sequence[tuple[str, int, Collection[str]]],
                    anchor: bool = True) -> dict[str, list[str]]:
        """``select`` for many requests; asks: (rid, how many, the drafters it may use now)."""
        return {rid: list(self.select(rid, available=avail, k=k, anchor=anchor)) for rid, k, avail in asks if avail}

    @told
    def update_many(self, updates: Sequence[tuple[str, str, float, int, int]],
                    rounds: Sequence[tuple[str, int]]) -> None:
        """``update`` (rid, drafter, confidence, accepted, proposed) and ``record_round``
        (rid, accepted) for a verified round's requests; one that ended meanwhile (a cancel)
        has nothing left to learn."""
        for rid, drafter, conf, acc, prop in updates:
            try:
                self.update(rid, drafter, conf, acc, prop)
            except KeyError:
                pass
        for rid, acc in rounds:
            try:
                self.record_round(rid, acc)
            except KeyError:
                pass

    @told
    def finish_many(self, rids: Sequence[str]) -> None:
        for rid in rids:
            self.finish(rid)

    def scores_many(self, rids: Sequence[str]) -> dict[str, dict[str, float]]:
        """Current scores per request (empty for one that finished meanwhile)."""
        return {rid: dict(self._reqs[rid].scores) if rid in self._reqs else {} for rid in rids}

    # -- inspection --------------------------------------------------------------------
    def scores(self, rid: str) -> dict[str, float]:
        return dict(self._req(rid, "scores").scores)

    def domain(self, rid: str) -> str:
        return self._req(rid, "domain").domain

    def accepted_length(self, rid: str) -> float | None:
        """Mean accepted length (1 + accepted) over the recent window; None before data."""
        w = self._req(rid, "accepted_length").window
        return float(np.mean(w)) if w else None

    @property
    def priors(self) -> dict[str, dict[str, float]]:
        """Learned per-domain mean final score of each drafter (only where there is data)."""
        return {dom: {n: s / c for n, (s, c) in d.items() if c} for dom, d in self._prior_sums.items()}

    @property
    def prior_counts(self) -> dict[str, dict[str, int]]:
        return {dom: {n: int(c) for n, (_, c) in d.items()} for dom, d in self._prior_sums.items()}

    @property
    def active(self) -> list[str]:
        return list(self._reqs)
