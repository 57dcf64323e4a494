"""Guided drafting: pure functions (docs/algorithms.md, "Guided drafting").

A weight-free drafter (prompt lookup, an n-gram table) proposes a whole chain for the
cost of a lookup. When the fused path is likely to follow that chain, the model drafters
take it as forced tokens and score every step of it in one forward: their own choice
and probability at each step come back as if they had drafted step by step. The fused
path follows the chain while the fusion picks the chain's token; where it picks another,
the steps after it were scored on the wrong prefix and are dropped.
"""

from __future__ import annotations

from typing import Callable, Mapping, Sequence


def guide_length(confidences: Sequence[float], min_reach: float) -> int:
    """Leading chain tokens whose chance of being reached, the product of the calibrated
    confidences up to and including them, stays at or above ``min_reach``."""
    reach, n = 1.0, 0
    for c in confidences:
        reach *= c
        if reach < min_reach:
            break
        n += 1
    return n


def pick_guide(chains: Mapping[int, tuple[Sequence[int], Sequence[float]]],
               confidence: Callable[[int, float], float], min_reach: float, cap: int) -> list[int]:
    """The guide for the next draft op: the longest usable prefix (see ``guide_length``) of
    any drafter's chain (drafter -> (tokens, stated probabilities)), at most ``cap`` tokens;
    ties go to the lower drafter index. Empty when no chain is worth a wider forward."""
    best: list[int] = []
    for i in sorted(chains):
        toks, probs = chains[i]
        n = min(cap, guide_length([confidence(i, float(p)) for p in probs[:cap]], min_reach))
        if n > len(best):
            best = [int(t) for t in toks[:n]]
    return best


def still_valid(chosen: Sequence[int], step: int, fused: int) -> bool:
    """Does a draft op whose chosen tokens are ``chosen`` still hold a proposal for step
    ``step + 1`` once ``fused`` is the fused token of step ``step``? Only if it continued
    from that very token, and drafted that far."""
    return step + 1 < len(chosen) and int(chosen[step]) == int(fused)
