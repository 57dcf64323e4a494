"""The draft phase of a round: a token tree for every request that verifies next
(docs/design.md, "A round"; formulas in docs/algorithms.md).

- speculative / specinfer: one multi-step chain op per drafter (``chain.py``);
- cosine: the router picks drafters (``routing.py``); a request routed to one drafter
  drafts one chain op, one routed to several fuses their proposals step by step
  (``fused.py``, ``fusion.py``, guided by weight-free chains: ``guide.py``); a round in
  which nobody proposed anything is rescued by a spare model drafter, and greedy trees
  are pruned by expected gain.

``Drafting.draft`` returns one ``Draft`` (trees.py) per request.
"""

from __future__ import annotations

import logging
from typing import Any

from cosine.config import ControllerConfig

from ..ports import Waits
from ..proxies import DraftJob, DraftOut
from ..request import Mode, Request
from ..speculation import DraftPlan, SpeculationController
from ..stats import ControllerStats
from .chain import draft_chains
from .drafters import DrafterSlot, Drafters
from .fused import draft_fused
from .trees import Draft

log = logging.getLogger("cosine.control.drafting")


class Drafting:
    """The draft phase, with the per-request drafting policies its parts share."""

    def __init__(self, cc: ControllerConfig, pool: Drafters, spec: SpeculationController, router: Any,
                 fuser: Any, stats: ControllerStats, waits: Waits):
        self.cc = cc
        self.pool = pool
        self.spec = spec
        self.router, self.fuser = router, fuser   # RouterPort and FuserPort (control/actors.py)
        self.stats, self.waits = stats, waits
        self._prefill_s = 0.0

    def draft(self, reqs: list[Request], plans: dict[str, DraftPlan],
              n_requests: int) -> tuple[dict[str, Draft], float]:
        """A draft per request (the root alone where it does not speculate), and the longest
        drafter prompt prefill the ops included (not drafting: paid once per request)."""
        self._prefill_s = 0.0
        drafts = {r.rid: Draft.root(r.committed[-1]) for r in reqs}
        for r in reqs:
            r.drafted = r.drafted or plans[r.rid].speculate
        speculating = [r for r in reqs if plans[r.rid].speculate]
        chains = [r for r in speculating if r.params.mode in (Mode.SPECULATIVE, Mode.SPECINFER)]
        fused = [r for r in speculating if r.params.mode is Mode.COSINE]
        if chains:
            draft_chains(self, chains, plans, drafts)
        if fused:
            self._route(fused, plans, drafts, alone=n_requests == 1)
            self._rescue(fused, plans, drafts)
            self._prune(fused, drafts)
        return drafts, self._prefill_s

    def run(self, jobs: dict[int, list[DraftJob]]) -> dict[int, dict[str, DraftOut]]:
        """One draft op per drafter (Drafters.run), keeping the phase's longest prefill."""
        outs, prefill_s = self.pool.run(jobs)
        self._prefill_s = max(self._prefill_s, prefill_s)
        return outs

    # -- cosine --------------------------------------------------------------------------
    def _route(self, reqs: list[Request], plans: dict[str, DraftPlan], drafts: dict[str, Draft], alone: bool) -> None:
        """The router picks each request's drafters; a request routed to one drafter drafts
        one multi-step chain op (the same chain as k fused steps, for one round trip), the
        others fuse their drafters' proposals step by step."""
        # The anchor (routing.anchor_model) is for a request that has the verifier to itself:
        # under load the batch gate weighs drafting against plain batched steps, and the
        # scores alone pick (measured at concurrency 4: 0.82x plain decoding anchored).
        by_name = self.pool.by_name
        asks = [(r.rid, self.cc.routing.max_drafters_per_request, {d.name for d in self.pool.usable(r)}) for r in reqs]
        picks = self.router.select_many(asks, alone)  # asked together, collected together
        scores = self.router.scores_many([r.rid for r in reqs]) if self.cc.fusion.weight_by_router else None
        sel = self.waits.get(picks, "router")
        self.stats.metrics.on_picks(sel)
        weights: dict[str, dict[int, float] | None] = {r.rid: None for r in reqs}
        if scores is not None:
            for rid, sc in self.waits.get(scores, "router").items():
                weights[rid] = {by_name[n].index: s for n, s in sc.items() if n in by_name}
        routed = {r.rid: [n for n in sel.get(r.rid, []) if n in by_name] for r in reqs}
        for r in reqs:
            drafts[r.rid].routed = routed[r.rid]
        solo = {rid: [by_name[ns[0]]] for rid, ns in routed.items() if len(ns) == 1}
        if solo:  # its chain expands the same top-`siblings` leaves as a fused step would
            flat = {r.rid: DraftPlan(plans[r.rid].speculate, plans[r.rid].draft_len, self.siblings(r))
                    for r in reqs if r.rid in solo}
            draft_chains(self, [r for r in reqs if r.rid in solo], flat, drafts, pick=solo)
        rest = [r for r in reqs if r.rid not in solo]
        if rest:
            draft_fused(self, rest, plans, drafts, weights)

    def _rescue(self, reqs: list[Request], plans: dict[str, DraftPlan], drafts: dict[str, Draft]) -> None:
        """A routed round whose drafters proposed nothing (a prompt-lookup drafter with no
        match) would verify the root alone, a plain decoding step. Give it to an engaged
        model drafter the router did not pick this round: its chain usually brings more
        than its draft costs, and its verified candidates update the router."""
        pick: dict[str, list[DrafterSlot]] = {}
        for r in reqs:
            if drafts[r.rid].tree.n > 1 or not plans[r.rid].speculate:
                continue
            spare = [d for d in self.pool.usable(r) if d.name in self.pool.model_names
                     and d.name not in drafts[r.rid].routed
                     and self.pool.fits(d, len(r.committed), plans[r.rid].draft_len)]
            if spare:
                pick[r.rid] = spare[:1]
        if pick:
            flat = {rid: DraftPlan(p.speculate, p.draft_len, 1) for rid, p in plans.items()}
            draft_chains(self, [r for r in reqs if r.rid in pick], flat, drafts, pick=pick)
            self.stats.rescued_rounds += len(pick)
            log.debug("rescue: %s drafted by %s (the routed drafters proposed nothing)",
                      sorted(pick), {rid: ds[0].name for rid, ds in pick.items()})

    def _prune(self, reqs: list[Request], drafts: dict[str, Draft]) -> None:
        """Drop each tree's nodes whose acceptance chance is below the node gain floor."""
        todo = [(r, self.spec.gain_floors(r.rid)[0]) for r in reqs
                if self.prunes(r) and drafts[r.rid].tree.n > 2]
        todo = [(r, g) for r, g in todo if g > 0.0]
        if not todo:
            return
        out = self.waits.get(self.fuser.prune([(drafts[r.rid].tree, r.domain, g) for r, g in todo]), "fuser")
        for (r, _), (_, kept) in zip(todo, out):
            self.stats.pruned_nodes += drafts[r.rid].keep(kept)

    # -- per-request policies ------------------------------------------------------------
    def siblings(self, r: Request) -> int:
        """Top-k candidates per drafter and fused step: greedy only (a sampled step is one
        draw per drafter, tested against its own q)."""
        return self.cc.fusion.siblings if r.params.temperature <= 0 else 1

    def guides(self, r: Request) -> bool:
        """Guided drafting for this request: greedy, and on in the config."""
        return self.cc.fusion.guide and r.params.temperature <= 0

    def step_floor(self, r: Request) -> float:
        """Fewest expected tokens one more fused draft step must bring (0 = no early stop)."""
        sc = self.cc.speculation
        return self.spec.gain_floors(r.rid)[1] if sc.prune and sc.adaptive else 0.0

    def prunes(self, r: Request) -> bool:
        """Cosine-mode greedy requests drop tree nodes not worth verifying. Sampling keeps
        every candidate: dropping a sample for its own low probability would bias the
        distribution multi-step speculative sampling relies on."""
        sc = self.cc.speculation
        return sc.prune and sc.adaptive and r.params.mode is Mode.COSINE and r.params.temperature <= 0

    def chain_stops(self, r: Request, k: int) -> list[float] | None:
        """A routed solo chain drafts in one op, so the fused early stop cannot end it step by
        step here: the drafter ends it itself after step j once the product of its tokens'
        probabilities is below step floor / P(position j + 2 accepted), the same rule in its
        own probabilities. Traced on docs: 8-step chains (0.2 s) pruned to 1-3 nodes."""
        floor = self.step_floor(r) if self.prunes(r) else 0.0
        if floor <= 0.0:
            return None
        return [min(1.0, floor / max(self.spec.rate_at(r.rid, j + 2), 1e-6)) for j in range(k)]
