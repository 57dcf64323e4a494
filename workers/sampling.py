"""A neural drafter's token choices: its distribution, its own pick (greedy or sampled),
its top-k, and the early stop of a greedy chain. Pure numpy."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .validate import DraftRequest


def softmax(logits: np.ndarray, temperature: float) -> np.ndarray:
    """Distribution at ``temperature``; 0 (greedy) reports the plain softmax (T = 1) so
    the drafter's confidence stays meaningful for fusion."""
    z = logits.astype(np.float64) / (temperature if temperature > 0 else 1.0)
    z -= z.max()
    p = np.exp(z)
    return p / p.sum()


def choose(logits: np.ndarray, probs: np.ndarray, temperature: float, rng: np.random.Generator) -> int:
    """The drafter's own token: the argmax (greedy), else one draw from ``probs`` (drawn
    even when the step is forced, so a seed gives the same stream either way)."""
    if temperature > 0:
        u = rng.random()
        return int(min(np.searchsorted(np.cumsum(probs), u * probs.sum(), side="right"), probs.size - 1))
    return int(np.argmax(logits))


def top_tokens(probs: np.ndarray, k: int) -> np.ndarray:
    """The k most likely token ids, probability descending, ties by lower id."""
    top = np.argpartition(-probs, k - 1)[:k] if k < probs.size else np.arange(probs.size)
    return top[np.lexsort((top, -probs[top]))]


@dataclass
class ChainStop:
    """Early stop of a greedy chain that drafts its own choices (draft op ``min_reach``):
    reach is the product of the chosen tokens' probabilities, and the chain ends after step
    j once reach < min_reach[j], so steps the caller would prune are never computed."""

    min_reach: list[float] | None
    reach: float = 1.0

    @classmethod
    def of(cls, p: DraftRequest) -> "ChainStop":
        return cls(p.min_reach if p.temperature <= 0 and p.forced is None else None)

    def after(self, step: int, prob: float) -> bool:
        """Does the chain end after ``step``, whose chosen token had probability ``prob``?"""
        if self.min_reach is None:
            return False
        self.reach *= prob
        return self.reach < self.min_reach[step]
