"""The fuser: confidence-based token fusion for the draft steps of many requests, the
guides and pruning that use the same confidences, and the calibration that verified
candidates teach it (docs/algorithms.md, "Fusion"). The object behind FuserActor; pure."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosine.tree import TokenTree

from ..ports import told
from .fusion import Calibration, make_rule, weighted
from .guide import pick_guide
from .trees import Proposal, fuse_candidates


@dataclass
class FuseStep:
    """One request's draft step to fuse: the proposals made after ``parent``."""

    tree: TokenTree
    parent: int
    proposals: list[Proposal]
    stochastic: bool
    weights: dict[int, float] | None  # per drafter index (router scores), or None
    domain: str


@dataclass
class Fused:
    tree: TokenTree                   # with the step's proposals added
    node: int | None                  # the fused node the drafters continue from (None = stop)
    dists: dict = field(default_factory=dict)  # (drafter, parent) -> q, for sampling
    confidence: float = 0.0           # P(target agrees with the fused token | its parent accepted)


class Fuser:
    def __init__(self, rule_name: str, min_confidence: float, calibrate: bool = True):
        self.rule = make_rule(rule_name, min_confidence)
        self.calibration = Calibration() if calibrate else None

    def fuse(self, steps: list[FuseStep]) -> list[Fused]:
        """One fusion step per request."""
        out = []
        for s in steps:
            dists: dict = {}
            rule = weighted(self.rule, s.weights)
            if self.calibration is not None:
                rule = self.calibration.rule(rule, s.domain)
            tree, node = fuse_candidates(s.tree, s.parent, s.proposals, rule, s.stochastic, dists)
            conf = 0.0 if node is None else self._confidence(s.domain, int(tree.proposers[node]),
                                                                float(tree.probs[node]))
            out.append(Fused(tree, node, dists, conf))
        return out

    def _confidence(self, domain: str, drafter: int, prob: float) -> float:
        """P(target agrees | parent accepted): calibrated, else the stated prob."""
        if self.calibration is not None:
            return self.calibration.confidence(domain, drafter, prob)
        return min(1.0, max(0.0, prob))

    def confidence(self, tree: TokenTree, domain: str) -> np.ndarray:
        """``_confidence`` of every node (the committed root: 1)."""
        return np.array([1.0] + [self._confidence(domain, int(tree.proposers[i]), float(tree.probs[i]))
                                 for i in range(1, tree.n)])

    def guides(self, items: list[tuple[str, dict[int, tuple[list[int], list[float]]], float, int]]
               ) -> list[list[int]]:
        """(domain, chains per drafter, min reach, cap) -> the guide for the next draft op."""
        return [pick_guide(ch, lambda i, p, d=domain: self._confidence(d, i, p), min_reach, cap)
                for domain, ch, min_reach, cap in items]

    def prune(self, items: list[tuple[TokenTree, str, float]]) -> list[tuple[TokenTree, np.ndarray]]:
        """(tree, domain, min_gain) -> (pruned tree, kept old node indices): nodes whose
        chance of being accepted is below min_gain tokens are not worth their verify cost."""
        return [tree.prune(self.confidence(tree, domain), gain) for tree, domain, gain in items]

    @told
    def observe(self, labels: list[tuple[str, int, float, bool]]) -> None:
        """Verified candidates (domain, drafter, its prob, target agreed) teach calibration."""
        if self.calibration is not None:
            for domain, drafter, prob, agreed in labels:
                self.calibration.observe(domain, drafter, prob, agreed)

    def calibration_table(self) -> dict[str, Any]:
        """Calibration.table(), for the serve stats (empty when calibration is off)."""
        return self.calibration.table() if self.calibration is not None else {}
