"""The planning phase: what this round does.

- ``Planner.plan``: each drafting request's plan (speculate or not, draft length, tree
  width), from its mode, the speculation controller, the verify-token cap and the batch
  gate (docs/algorithms.md, "Adaptive speculation control", "Batch-level speculation gate");
- ``Scheduler.schedule``: which requests verify this round (``scheduling.select_batch``
  under the round's caps) and which draft meanwhile (pipelining).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

from cosine.config import Config, SpeculationConfig

from .costs import CostBook
from .drafting.drafters import Drafters
from .drafting.trees import Draft
from .request import Mode, Request
from .scheduling import PendingRequest, select_batch
from .speculation import OFF, DraftPlan, GoodputGate, SpeculationController, speculation_pays
from .stats import ControllerStats

log = logging.getLogger("cosine.control.planning")


class BatchGate:
    """Plain batched decoding for this round's cosine requests when speculation would commit
    fewer tokens per second (under load): by the cost model ("model": measured verify calls
    and draft steps, the start-up profile before those exist) or by the goodput of measured
    rounds ("measured", control/speculation.py GoodputGate)."""

    def __init__(self, sc: SpeculationConfig, spec: SpeculationController, costs: CostBook, stats: ControllerStats):
        self.sc, self.spec, self.costs, self.stats = sc, spec, costs, stats
        self.goodput = GoodputGate(sc.gate_window, sc.gate_explore_every)
        self.streak: dict[str, int] = {}  # rid -> consecutive rounds the gate ran it plain
        self.gap: dict[str, int] = {}     # rid -> gated rounds before its next probe
        # Did the gate's last decision over several requests keep them plain? While it does,
        # model drafters are not engaged for more requests (Drafters.engage_waits).
        self.batch_plain = sc.adaptive and sc.gate != "off"

    def apply(self, reqs: list[Request], plans: dict[str, DraftPlan], width: int,
              n_requests: int) -> dict[str, DraftPlan]:
        """``plans`` with the gated requests' speculation off (``width``: drafters per step)."""
        cos = [r.rid for r in reqs if r.params.mode is Mode.COSINE and self.sc.adaptive and plans[r.rid].speculate]
        if not cos or self.sc.gate == "off":
            if any(r.params.mode is Mode.COSINE for r in reqs):  # none could draft: the gate has nothing
                self.batch_plain = False                          # to weigh, so engagement must not wait on it
            return plans
        if self.sc.gate == "model" and len(plans) == 1:
            # One request alone has no batch to decode plainly with: its own off-switch
            # (SpeculationController, from its measured rounds) decides. Gating it on the
            # global priors before it ever drafted would keep it plain for good.
            return plans
        pays = self._pays(reqs, cos, plans, width)
        if self.sc.gate == "measured":  # the measured gate explores by itself: no per-request probes
            self.batch_plain = not self.goodput.decide(n_requests, pays)
            if not self.batch_plain:
                return plans
            self.stats.gated_rounds += 1
            return {rid: (OFF if rid in cos else p) for rid, p in plans.items()}
        self.batch_plain = not pays()
        if not self.batch_plain:
            for rid in cos:
                self.forget(rid)
            return plans
        self.stats.gated_rounds += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("gate: plain round for %s (rates %s, draft step %s, prefill/token %s, measured line %s)",
                      cos, {rid: self.spec.rates(rid) for rid in cos}, self.spec.draft_step_global,
                      self.costs.prefill_token_s, self.costs.calls_measured())
        return self.back_off(reqs, cos, plans)

    def _pays(self, reqs: list[Request], cos: list[str], plans: dict[str, DraftPlan],
              width: int) -> Callable[[], bool]:
        """Does speculating pay this round, by the cost book (speculation_pays)?"""
        seq = max(len(r.committed) for r in reqs)
        wide = {rid: DraftPlan(p.speculate, p.draft_len, p.tree_width * width) for rid, p in plans.items()}
        B, S = len(plans), len(cos)  # the batch verifies together; the S speculating requests draft together
        measured = self.costs.calls_measured()
        step = self.spec.draft_step_global
        profile = self.costs.profile

        def pays() -> bool:
            verify = (self.costs.call_verify_s if measured
                      else (lambda n: profile.verify_s(B, max(1, round(n / B)), seq)))
            draft = (lambda k: step * k) if step is not None else (lambda k: profile.draft_s(S, k, seq))
            fresh = sum(len(r.committed) for r in reqs if r.rid in cos and not r.drafted)
            return speculation_pays(wide, {rid: self.spec.rates(rid) for rid in cos}, verify, draft,
                                    self.sc.disable_below_ratio,
                                    fresh * (self.costs.prefill_token_s or 0.0) / self.spec.probe_every)
        return pays

    def back_off(self, reqs: list[Request], cos: list[str], plans: dict[str, DraftPlan]) -> dict[str, DraftPlan]:
        """A gated request learns nothing about its acceptance rate, so after probe_every
        gated rounds it speculates once anyway (else one pessimistic estimate would lock it
        out). A probe that changes nothing doubles the wait for the next (up to 8x): under
        steady load the probes' cost shrinks towards nothing."""
        out = dict(plans)
        every = self.spec.probe_every
        by_rid = {r.rid: r for r in reqs}
        for rid in cos:
            n = self.streak[rid] = self.streak.get(rid, 0) + 1
            gap = self.gap.get(rid, every)
            if n < gap or not by_rid[rid].drafted:  # a request that never drafted has nothing to refresh
                out[rid] = OFF
            else:
                self.streak[rid] = 0
                self.gap[rid] = min(8 * every, 2 * gap)
        return out

    def forget(self, rid: str) -> None:
        self.streak.pop(rid, None)
        self.gap.pop(rid, None)


class Planner:
    def __init__(self, cfg: Config, spec: SpeculationController, gate: BatchGate, drafters: Drafters):
        self.sc = cfg.controller.speculation
        self.max_drafters = cfg.controller.routing.max_drafters_per_request
        self.max_tree_nodes = cfg.limits.max_tree_nodes
        self.spec, self.gate, self.drafters = spec, gate, drafters

    def plan(self, reqs: list[Request], n_requests: int) -> dict[str, DraftPlan]:
        """The plan of every request in ``reqs`` (those without a tree waiting)."""
        plans = {r.rid: self._by_mode(r) for r in reqs}
        if plans:
            k = min(max(1, len(self.drafters.alive())), self.max_drafters)
            plans = self.spec.trim_to_cap(plans, lambda p: 1 + p.draft_len * p.tree_width * k if p.speculate else 1)
            plans = self.gate.apply(reqs, plans, k, n_requests)
        return {r.rid: self._fit(r, plans[r.rid]) for r in reqs}

    def _by_mode(self, r: Request) -> DraftPlan:
        """The mode table: plain decoding (autoregressive, or no drafter to use), the
        speculation controller's plan (cosine, adaptive), else the configured draft."""
        if r.params.mode is Mode.AUTOREGRESSIVE or not self.drafters.usable(r):
            return DraftPlan(False, 0, 1)
        if r.params.mode is Mode.COSINE and self.sc.adaptive:
            plan = self.spec.plan(r.rid, r.domain)
            if log.isEnabledFor(logging.DEBUG):
                log.debug("plan rid=%s %s %s", r.rid, plan, self.spec.explain(r.rid))
            return plan
        return DraftPlan(True, self.sc.draft_len, self.sc.tree_width)

    def _fit(self, r: Request, p: DraftPlan) -> DraftPlan:
        """Cut the plan to what fits: the output budget, the context, and max_tree_nodes
        (every draft step adds up to one node per drafter, times the width for expansions)."""
        n_use = max(1, len(self.drafters.usable(r)))
        per_step = {Mode.SPECULATIVE: 1, Mode.SPECINFER: n_use * max(1, p.tree_width),
                    Mode.COSINE: min(n_use, self.max_drafters)}.get(r.params.mode, 1)
        n = min(p.draft_len, room(r), (self.max_tree_nodes - 1) // per_step) if p.speculate else 0
        width = 1 if r.params.temperature > 0 else p.tree_width
        return DraftPlan(n > 0, n, width)


def room(r: Request) -> int:
    """Draft tokens that still fit: positions and the remaining output budget."""
    return max(0, min(r.context_limit - len(r.committed), r.params.max_tokens - len(r.output)))


@dataclass
class RoundBatch:
    """Who does what this round."""

    draft_first: list[Request] = field(default_factory=list)  # drafted now, verified right after
    verify: list[Request] = field(default_factory=list)       # verified this round (their trees)
    alongside: list[Request] = field(default_factory=list)    # pipelined: drafting while the verifier works
    held_back: int = 0                                        # pipelined requests left to draft next round


class Scheduler:
    def __init__(self, cfg: Config, costs: CostBook, pipelined: bool, n_drafters: int, verifiers: Sequence[str]):
        self.cfg, self.costs = cfg, costs
        self.pipelined = pipelined
        self.n_drafters = n_drafters
        self.n_verifiers = len(verifiers)
        self.kv_budget = sum(cfg.worker(n).kv_budget_tokens for n in verifiers)

    def schedule(self, reqs: list[Request], waiting: Mapping[str, Draft], plans: dict[str, DraftPlan]) -> RoundBatch:
        """Pipelined cosine requests alternate: those holding a tree (``waiting``) verify
        while the others draft. A cosine request that does not speculate this round (no
        live drafter, speculation switched off) is verified right away like the
        sequential modes, which draft right before they verify."""
        pipelined = [r for r in reqs if self.pipelined and r.params.mode is Mode.COSINE
                     and (r.rid in waiting or plans[r.rid].speculate)]
        sequential = [r for r in reqs if r not in pipelined]
        candidates = [r for r in pipelined if r.rid in waiting] + sequential
        chosen = self.choose(candidates, waiting, plans)
        out = RoundBatch(draft_first=[r for r in sequential if r.rid in chosen],
                         verify=[r for r in candidates if r.rid in chosen])
        # Balance the groups: when far more requests wait to draft than to verify, hold
        # some back a round.
        to_draft = [r for r in pipelined if r.rid not in waiting]
        out.held_back = max(0, (len(to_draft) - len(out.verify)) // 2) if len(to_draft) > 1 else 0
        out.alongside = to_draft[:len(to_draft) - out.held_back]
        return out

    def choose(self, cands: list[Request], waiting: Mapping[str, Draft], plans: dict[str, DraftPlan]) -> set[str]:
        """The candidates that verify this round (``select_batch`` under the round's caps);
        never none: the oldest request always goes."""
        if not cands:
            return set()
        now = time.monotonic()
        pool = []
        for r in cands:
            d = waiting.get(r.rid)
            planned = d.tree.n if d is not None else 1 + (plans[r.rid].draft_len if r.rid in plans else 0) * \
                max(1, self.n_drafters if r.params.mode is Mode.SPECINFER else 1)
            pool.append(PendingRequest(rid=r.rid, seq_len=len(r.committed), planned_tokens=planned,
                                       waiting_s=now - r.wait_since, cache_tokens=len(r.committed) + planned))
        sch = self.cfg.controller.scheduling
        n = self.n_verifiers
        chosen = select_batch(pool, self.costs.profile, max_batch=sch.max_batch * n,
                              max_verify_tokens=sch.max_verify_tokens * n, memory_budget_tokens=self.kv_budget,
                              latency_weight=sch.latency_weight,
                              latency_bound_s=sch.latency_bound_ms / 1000.0 if sch.latency_bound_ms else None)
        ids = set(chosen)
        if not ids:  # never starve: the oldest request always goes
            ids = {max(pool, key=lambda p: p.waiting_s).rid}
        return ids
