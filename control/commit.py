"""The commit phase: a verified round's tokens join the request (stop rules, streaming),
and every learner hears how the round went: the router (drafter scores), fusion's
calibration (each candidate's label), cost-based engagement and speculation control
(acceptance per position, draft and verify costs). Router and calibration updates are
tells: the next round does not wait for them.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from typing import Any, Callable

import numpy as np

from .drafting.drafters import Drafters
from .drafting.engagement import FREE, Engagement
from .drafting.trees import agreement
from .request import Mode, Request
from .speculation import SpeculationController
from .stats import ControllerStats
from .verification import VerifyOutcome
from .wire import Chunk, Event

log = logging.getLogger("cosine.control.commit")

Update = tuple[str, str, float, int, int]   # (rid, drafter, mean confidence, accepted, proposed): Router.update
Label = tuple[str, int, float, bool]        # (domain, drafter, its prob, target agreed): Fuser.observe


class Commit:
    def __init__(self, spec: SpeculationController, engagement: Engagement | None, drafters: Drafters,
                 router: Any, fuser: Any, stats: ControllerStats, emit: Callable[[Event], None]):
        self.spec, self.engagement, self.drafters = spec, engagement, drafters
        self.router, self.fuser = router, fuser   # RouterPort, FuserPort
        self.stats, self.emit = stats, emit

    def commit(self, outcomes: list[VerifyOutcome]) -> list[Request]:
        """Commit and stream every outcome; returns the requests that finished."""
        updates: list[Update] = []
        rounds: list[tuple[str, int]] = []
        labels: list[Label] = []
        finished = []
        for o in outcomes:
            r, n_acc = o.request, len(o.tokens) - 1
            r.rounds += 1
            r.accepted_drafts += n_acc
            self.stats.rounds += 1
            self.stats.accepted_drafts += n_acc
            start = len(updates)
            self._credit(o, updates, labels)
            if o.draft.drafters and r.params.mode is Mode.COSINE:
                rounds.append((r.rid, n_acc))
            self._learn(o, n_acc, updates[start:])
            if self._accept(o):
                finished.append(r)
        if updates or rounds:
            self.router.update_many.defer(updates, rounds)
        if labels:
            self.fuser.observe.defer(labels)
        return finished

    def _credit(self, o: VerifyOutcome, updates: list[Update], labels: list[Label]) -> None:
        """Each drafter's score sample for the router. Routed rounds: per-position agreement
        with the target over all its candidates (the labels also calibrate fusion); else how
        far its chain matched the committed tokens."""
        r, d = o.request, o.draft
        if d.labels:
            per: dict[int, list[float]] = defaultdict(lambda: [0.0, 0, 0])
            for i, prob, agreed in agreement(d.labels, o.argmax):
                per[i][0] += prob
                per[i][1] += agreed
                per[i][2] += 1
                labels.append((r.domain, i, prob, agreed))
            for i, (psum, hits, trials) in per.items():
                updates.append((r.rid, self.drafters.slots[i].name, psum / trials, hits, trials))
            return
        for name, (toks, probs) in d.proposals.items():
            if not toks:
                continue
            match = 0
            while match < len(toks) and match < len(o.tokens) and toks[match] == o.tokens[match]:
                match += 1
            updates.append((r.rid, name, float(np.mean(probs)), match, len(toks)))

    def _learn(self, o: VerifyOutcome, n_acc: int, credit: list[Update]) -> None:
        """Engagement and speculation control learn from a cosine round's cost and yield."""
        r, d = o.request, o.draft
        if log.isEnabledFor(logging.DEBUG):
            log.debug("round rid=%s mode=%s nodes=%d accepted=%d draft_s=%.3f verify_s=%.3f drafters=%s agreed=%s",
                      r.rid, r.params.mode, d.tree.n, n_acc, d.draft_s, o.call_s, d.drafters,
                      {u[1]: f"{u[3]}/{u[4]}@{u[2]:.2f}" for u in credit})
        drafted = d.tree.n - 1
        if r.params.mode is Mode.COSINE and self.engagement is not None:
            for arm in [n for n in d.drafters if n in self.drafters.model_names] or [FREE]:
                self.engagement.observe(r.domain, arm, n_acc + 1.0, d.draft_s + o.share_s)
        if r.params.mode is Mode.COSINE and drafted:
            # depth: the positions verified (early stop and pruning may end short of the plan)
            self.spec.observe(r.rid, drafted, n_acc, d.draft_s, o.share_s, depth=int(d.tree.depths().max()),
                              overlapped_s=d.overlap_s,
                              steps=max((len(t) for t, _ in d.proposals.values()), default=0))
        elif d.tree.n == 1:
            self.spec.observe_plain(o.call_s)
        r.drafters_used.update(d.drafters)

    def _accept(self, o: VerifyOutcome) -> bool:
        """The round's tokens join the request, up to its first stop; streamed when asked.
        Returns whether the request finished."""
        r = o.request
        text, ids = r.accept(o.tokens)
        self.stats.metrics.on_round(r.rid, o.draft.tree.proposers, o.nodes, len(ids))
        self.stats.tokens += len(ids)
        r.commit_nodes = o.nodes
        r.wait_since = time.monotonic()
        if r.params.stream and (text or ids):
            self.emit(Chunk(r.client, text, ids))
        return r.done
