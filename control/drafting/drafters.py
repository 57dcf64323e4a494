"""The drafter workers as the controller sees them: which are alive, which a request may
use now (pins, cost-based engagement, background prefill), and one draft op per drafter.

A drafter that fails is marked dead and probed every few seconds; one that answers again
is re-admitted with an empty cache (docs/reliability.md).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import pykka

from cosine.config import ControllerConfig

from ..costs import CostBook
from ..ports import Waits
from ..proxies import DraftJob, DraftOut, Timed
from ..request import Mode, Request
from ..speculation import SpeculationController
from ..stats import ControllerStats
from .engagement import FREE, Engagement

log = logging.getLogger("cosine.control.drafters")


@dataclass
class DrafterSlot:
    name: str
    index: int
    port: Any                        # DrafterPort (control/actors.py) or Inline(DrafterProxy)
    max_positions: int
    domains: tuple[str, ...] = ()
    alive: bool = True
    next_probe: float = 0.0
    probe: Any = None                # pending probe future
    busy_s: float = 0.0
    warm: tuple[Any, list[str]] | None = None  # background prefill in flight: (future, its rids)


def draft_job(r: Request, context: list[int], k: int, topk: int = 1, forced: list[int] | None = None,
              min_reach: list[float] | None = None) -> DraftJob:
    stochastic = r.params.temperature > 0
    return DraftJob(rid=r.rid, context=context, k=k, topk=topk, temperature=r.params.temperature,
                    return_probs=stochastic, seed=int(r.rng.integers(2 ** 31)) if stochastic else None,
                    forced=forced, min_reach=min_reach)


class Drafters:
    """The drafter slots plus the policies of who drafts for whom."""

    def __init__(self, slots: list[DrafterSlot], model_names: set[str], cc: ControllerConfig, background: bool,
                 spec: SpeculationController, costs: CostBook, stats: ControllerStats, waits: Waits,
                 engagement: Engagement | None, engage_waits: Callable[[], bool]):
        self.slots = slots
        self.by_name = {d.name: d for d in slots}
        self.model_names = model_names       # the neural drafters (a forward per step)
        self.worker_timeout = cc.worker_timeout_s
        self.probe_every_s = max(1.0, min(5.0, cc.worker_timeout_s))
        self.background = background         # model drafters prefill new prompts off the critical path
        self.spec, self.costs, self.stats, self.waits = spec, costs, stats, waits
        self.engagement = engagement
        # While the batch gate keeps several requests plain, model drafters are not engaged
        # for more: their prompt prefill would take CPU/GPU time from the batch's plain
        # rounds for drafts the gate would not verify (traced at concurrency 4: the 0.5B
        # prefilled 3 prompts the gate then never drafted for).
        self.engage_waits = engage_waits

    # -- health ------------------------------------------------------------------------
    def alive(self) -> list[DrafterSlot]:
        return [d for d in self.slots if d.alive]

    def check_health(self, requests: Mapping[str, Request]) -> None:
        """Probe the dead drafters; re-admit those that answer (with an empty cache)."""
        now = time.monotonic()
        for d in self.slots:
            if d.alive:
                continue
            if d.probe is not None:
                try:
                    ok = d.probe.get(timeout=0)  # a poll: the round never waits on a probe
                except pykka.Timeout:
                    continue
                d.probe = None
                if ok:
                    d.alive = True
                    self.stats.metrics.on_worker(d.name, True)
                    for r in requests.values():  # it holds no prompt now: prefill afresh
                        r.warmed.discard(d.name)
                    log.info("drafter %s answers again; re-admitted (its cache starts empty)", d.name)
                    continue
                d.next_probe = now + self.probe_every_s
            elif now >= d.next_probe:
                d.probe = d.port.probe(min(1.0, self.worker_timeout))

    def mark_dead(self, d: DrafterSlot, why: str) -> None:
        self.stats.metrics.on_worker(d.name, False)
        if d.alive:
            log.warning("drafter %s marked dead (%s); continuing without it and probing it every %.0f s",
                        d.name, why, self.probe_every_s)
        d.alive = False
        d.next_probe = time.monotonic() + self.probe_every_s

    # -- who drafts for whom -------------------------------------------------------------
    @staticmethod
    def fits(d: DrafterSlot, context_len: int, k: int) -> bool:
        return context_len + k <= d.max_positions

    def usable(self, r: Request) -> list[DrafterSlot]:
        """Alive drafters this request may use (GenParams.drafters pins a subset)."""
        pin = r.params.drafters
        return [d for d in self.slots if d.alive and (not pin or d.name in pin)
                and (r.params.mode is not Mode.COSINE or self.engaged(r, d) and not self.warming(r, d))]

    def engaged(self, r: Request, d: DrafterSlot) -> bool:
        """May model drafter ``d`` draft for cosine request ``r``? Once engaged it stays (its
        prompt prefill is paid); a pinned drafter is always engaged. While the batch gate keeps
        several requests plain, engaging waits (``engage_waits``)."""
        if d.name in r.engaged or d.name not in self.model_names:
            return True
        if self.engage_waits() and d.name not in r.params.drafters:
            return False  # deferred, not declined: decided again once the gate opens or r is alone
        if self.engagement is None:
            r.engaged.add(d.name)
            return True
        per_token = self.costs.prefill_token_s
        pf = per_token * len(r.committed) if per_token is not None else 0.0
        if d.name in r.params.drafters or self.engagement.decide(
                r.domain, d.name, r.domain in d.domains, r.params.max_tokens - len(r.output), pf):
            r.engaged.add(d.name)
            if r.output:  # its acceptance rates so far were the weight-free drafters': start afresh
                self.spec.forget(r.rid)
            log.debug("engage rid=%s drafter=%s domain=%s after %d tokens (goodput free %s, with it %s)", r.rid,
                      d.name, r.domain, len(r.output), self.engagement.goodput(r.domain, FREE),
                      self.engagement.goodput(r.domain, d.name))
            return True
        return False

    def warming(self, r: Request, d: DrafterSlot) -> bool:
        """Is ``d`` busy with a background prefill, or still to prefill ``r``'s prompt?"""
        return (self.background and r.params.mode is Mode.COSINE and d.name in self.model_names
                and (d.warm is not None or d.name not in r.warmed))

    # -- ops ---------------------------------------------------------------------------
    def warm(self, requests: Mapping[str, Request]) -> None:
        """Background drafter prefill (cosine mode): a model drafter prefills the prompts of
        new requests in one op while the rounds go on; until it is done, those requests
        draft with the other drafters (``usable``). Its prompt prefill thus overlaps the
        target's verification instead of delaying every new request's first round."""
        if not self.background:
            return
        for d in self.slots:
            if d.warm is not None:
                self._warmed(d, requests)
            if d.warm is None and d.alive and d.probe is None and d.name in self.model_names:
                todo = [r for r in requests.values() if r.params.mode is Mode.COSINE and d.name not in r.warmed
                        and (not r.params.drafters or d.name in r.params.drafters)
                        and self.fits(d, len(r.committed), 1) and self.engaged(r, d)]
                if todo:
                    d.warm = (d.port.warm([(r.rid, list(r.committed)) for r in todo]), [r.rid for r in todo])

    def _warmed(self, d: DrafterSlot, requests: Mapping[str, Request]) -> None:
        """Collect ``d``'s background prefill if it is done."""
        assert d.warm is not None
        fut, rids = d.warm
        try:
            res: Timed = fut.get(timeout=0)  # a poll: the round never waits on a background prefill
        except pykka.Timeout:
            return
        d.warm = None
        d.busy_s += res.busy_s
        if res.error == "dead":
            self.mark_dead(d, res.message)
            return
        if res.error:  # those requests prefill inline in their first draft op instead
            log.warning("drafter %s refused a background prefill (%s)", d.name, res.message)
        elif res.value:
            self.stats.background_prefills += len(rids)
            self.costs.observe_prefill(res.busy_s, res.value)
        for rid in rids:
            if rid in requests:
                requests[rid].warmed.add(d.name)

    def run(self, jobs: Mapping[int, list[DraftJob]]) -> tuple[dict[int, dict[str, DraftOut]], float]:
        """One draft op per drafter, all in flight at once; failed drafters are marked dead.
        Returns the outputs per drafter index and the longest prompt prefill among the ops
        (paid once per request: speculation control must not count it as drafting)."""
        futs = {i: self.slots[i].port.draft(js) for i, js in jobs.items() if js}
        out: dict[int, dict[str, DraftOut]] = {}
        prefill_s = 0.0
        for i, f in futs.items():
            d = self.slots[i]
            res: Timed = self.waits.get(f, "drafters")
            d.busy_s += res.busy_s
            prefill_s = max(prefill_s, res.extra.get("prefill_s", 0.0))
            n_pre = res.extra.get("prefill_tokens", 0)
            if n_pre and d.name in self.model_names:  # the drafter that bounds prefill time
                self.costs.observe_prefill(res.extra["prefill_s"], n_pre)
            if res.error == "dead":
                self.mark_dead(d, res.message)
            elif res.error:
                self.stats.refused_drafts += 1
                log.warning("drafter %s refused a draft batch (%s); those requests go without it this step",
                            d.name, res.message)
            else:
                out[i] = res.value
        return out, prefill_s

    def release(self, rid: str) -> None:
        """Free a finished request's cache on every drafter (tells: nothing waits for them)."""
        for d in self.slots:
            d.port.release.defer([rid])

