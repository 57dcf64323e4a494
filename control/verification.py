"""The verify phase: one verify op per verifier for the round's trees (each op also commits
the previous round's accepted nodes inline), then the accepted path of every tree
(control/verify.py: greedy matching or multi-step speculative sampling).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from cosine.keyslots import KeyLayout, place

from .admission import VerifierSlot
from .costs import CostBook
from .drafting.trees import Draft
from .metrics import ServeMetrics
from .ports import Waits
from .proxies import Timed
from .request import Failure, Request
from .stats import ControllerStats
from .verify import accept
from .wire import client_code

log = logging.getLogger("cosine.control.verification")

Item = tuple[Request, Draft]


@dataclass
class VerifyOutcome:
    """One request's verified round, for the commit phase."""

    request: Request
    draft: Draft
    tokens: list[int]        # the accepted drafted tokens, then the target's bonus token
    nodes: list[int]         # the accepted nodes, root first (committed inline by the next verify)
    argmax: np.ndarray       # the target's argmax after every node: labels every candidate
    share_s: float           # this request's share of its verify call (by tree size)
    call_s: float            # the whole call


@dataclass
class Verified:
    outcomes: list[VerifyOutcome] = field(default_factory=list)
    failed: list[Failure] = field(default_factory=list)
    # requests their verifier lost (it died, or restarted and holds no cache for them):
    # parked and prefilled again, not failed; and the verifiers that stopped answering
    lost: list[tuple[Request, str]] = field(default_factory=list)
    dead: dict[int, str] = field(default_factory=dict)
    busy_s: float = 0.0      # the verifiers' time on this round's calls


@dataclass
class _Call:
    verifier: int
    items: list[Item]
    future: Any
    logits: bool             # sampling requests need the target's logits, not just its argmax


def prune_inexact(r: Request, d: Draft, layout: KeyLayout) -> int:
    """Prune a greedy draft to the nodes its verifier computes exactly as decoding would
    (cosine/keyslots.py: siblings near the end of a 128-key block find no column in their
    lane); the root sits at the last committed position. Returns the nodes dropped."""
    if d.tree.n == 1:
        return 0
    placed = place(d.tree.parents, len(r.committed) - 1, layout)
    return d.keep(np.flatnonzero(placed.exact)) if not placed.exact.all() else 0


class Verification:
    def __init__(self, verifiers: list[VerifierSlot], costs: CostBook, waits: Waits, stats: ControllerStats):
        self.verifiers, self.costs, self.waits, self.stats = verifiers, costs, waits, stats
        self.metrics: ServeMetrics = stats.metrics

    def issue(self, items: list[Item]) -> list[_Call]:
        """Send every verifier its requests' trees (asynchronously: drafting may go on)."""
        by_v: dict[int, list[Item]] = defaultdict(list)
        for r, d in items:
            by_v[r.verifier].append((r, d))
        return [self._send(i, its, any(r.params.temperature > 0 for r, _ in its)) for i, its in by_v.items()]

    def _send(self, i: int, items: list[Item], logits: bool) -> _Call:
        layout = self.verifiers[i].layout
        if layout is not None:
            for r, d in items:
                if r.params.temperature <= 0:
                    self.stats.inexact_pruned += prune_inexact(r, d, layout)
        trees = [(r.rid, np.asarray(d.tree.tokens, np.int32), np.asarray(d.tree.parents, np.int32), r.commit_nodes)
                 for r, d in items]
        return _Call(i, items, self.verifiers[i].port.verify(trees, logits), logits)

    def collect(self, calls: list[_Call]) -> Verified:
        out = Verified()
        for c in calls:
            v = self.verifiers[c.verifier]
            res: Timed = self.waits.get(c.future, "verifiers")
            if res.error == "soft" and len(c.items) > 1:
                # one bad request fails the whole batch and changes nothing: isolate it
                log.warning("verify batch on %s refused (%s); retrying one by one", v.name, res.message)
                for item in c.items:
                    one = self._send(c.verifier, [item], c.logits)
                    self._accept(v, one.items, self.waits.get(one.future, "verifiers"), out)
                continue
            self._accept(v, c.items, res, out)
        return out

    def _accept(self, v: VerifierSlot, items: list[Item], res: Timed, out: Verified) -> None:
        """The accepted path of every tree of one verify call."""
        v.busy_s += res.busy_s
        out.busy_s += res.busy_s
        self.metrics.on_worker(v.name, res.error != "dead")
        if res.error == "dead" or res.extra.get("code") == "unknown_request":
            if res.error == "dead":
                out.dead[self.verifiers.index(v)] = res.message
            out.lost += [(r, f"{v.name}: {res.message}") for r, _ in items]
            return
        if res.error:
            code = client_code(res.error, res.extra.get("code"))
            out.failed += [Failure(r, code, f"verification on {v.name} failed: {res.message}") for r, _ in items]
            return
        n_total = sum(d.tree.n for _, d in items)
        self.costs.observe_call(n_total, res.busy_s)
        for r, d in items:
            argmax, logits = res.value[r.rid]
            try:
                vr = accept(d.tree, argmax, logits, r.params.temperature, r.params.top_p, d.dists, r.rng)
            except Exception:  # noqa: BLE001 - one request's bad numbers must not fail the whole round
                log.exception("verification of request %s failed; failing that request only", r.rid)
                out.failed.append(Failure(r, "internal", "verification failed on the server (see its log)"))
                continue
            out.outcomes.append(VerifyOutcome(r, d, [int(t) for t in vr.tokens], [int(n) for n in vr.nodes],
                                              np.asarray(argmax), res.busy_s * d.tree.n / max(n_total, 1),
                                              res.busy_s))
