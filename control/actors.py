"""The control plane's actors (Pykka threads). Actors hold state and move messages; the
algorithms (fusion, verification, routing, speculation control, scheduling) are the pure
functions of the sibling modules.

    frontend (serve.py) --submit/cancel/stats--> ControllerActor --emit--> frontend
    ControllerActor --draft--> DrafterProxyActor x N  (one per drafter worker)
                    --fuse---> FuserActor
                    --select/update--> RouterActor
                    --prefill/verify/release--> VerifierProxyActor x M

One round ("tick") of the controller:
  1. admit new requests (prefill the target with prompt[:-1]; the last prompt token is the root);
  2. requests of the non-pipelined modes draft now (speculative, specinfer);
  3. the scheduler picks which requests with a tree go to verification; one verify op per
     verifier is issued (asynchronously, on the verifier actors' threads);
  4. meanwhile cosine-mode requests that need drafts are drafted (pipelining: drafting of
     one group overlaps verification of the other);
  5. verification results are accepted, emitted and committed (inline in the next verify).
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import pykka

from cosine.config import Config
from cosine.protocol import VERSION

from .costs import CostBook, CostModel
from .drafting import trees as rounds
from .drafting.engagement import FREE, Engagement
from .drafting.fusion import Calibration, make_rule, weighted
from .drafting.guide import pick_guide, still_valid
from .drafting.routing import Router
from .proxies import DraftJob, DraftOut, Timed
from .request import Mode, Request
from .scheduling import PendingRequest, select_batch
from .speculation import DraftPlan, GoodputGate, SpeculationController, speculation_pays

log = logging.getLogger("cosine.control.actors")

Emit = Callable[[Any, dict[str, Any]], None]


class RouterActor(pykka.ThreadingActor):
    """Owns the Router (per-request drafter scores)."""

    def __init__(self, router: Router):
        super().__init__()
        self.router = router

    def start_request(self, rid: str, prompt_text: str) -> str:
        return self.router.start(rid, prompt_text)

    def select(self, asks: list[tuple[str, int, set[str]]], anchor: bool = True) -> dict[str, list[str]]:
        """asks: (rid, how many, the drafters that request may use now)."""
        return {rid: list(self.router.select(rid, available=avail, k=k, anchor=anchor)) for rid, k, avail in asks
                if avail}

    def update(self, updates: list[tuple[str, str, float, int, int]], rounds_: list[tuple[str, int]]) -> None:
        for rid, drafter, conf, acc, prop in updates:
            try:
                self.router.update(rid, drafter, conf, acc, prop)
            except KeyError:  # the request ended meanwhile (cancel): nothing to learn
                pass
        for rid, acc in rounds_:
            try:
                self.router.record_round(rid, acc)
            except KeyError:
                pass

    def finish(self, rids: list[str]) -> None:
        for rid in rids:
            self.router.finish(rid)

    def scores(self, rids: list[str]) -> dict[str, dict[str, float]]:
        out = {}
        for rid in rids:
            try:
                out[rid] = self.router.scores(rid)
            except KeyError:  # finished meanwhile
                out[rid] = {}
        return out


class FuserActor(pykka.ThreadingActor):
    """Confidence-based token fusion for one draft step of many requests."""

    def __init__(self, rule_name: str, min_confidence: float, calibrate: bool = True):
        super().__init__()
        self.rule = make_rule(rule_name, min_confidence)
        self.calibration = Calibration() if calibrate else None

    def fuse(self, items: list[tuple[Any, int, list, bool, dict[int, float] | None, str]]
             ) -> list[tuple[Any, int | None, dict, float]]:
        """One fusion step per item: (tree, fused node or None, q per (drafter, parent) for
        sampling, the fused node's confidence: P(target agrees | its parent accepted))."""
        out = []
        for tree, parent, cands, stochastic, weights, domain in items:
            dists: dict = {}
            rule = weighted(self.rule, weights)
            if self.calibration is not None:
                rule = self.calibration.rule(rule, domain)
            t, fused = rounds.fuse_candidates(tree, parent, cands, rule, stochastic, dists)
            conf = 0.0 if fused is None else self._confidence(domain, int(t.proposers[fused]), float(t.probs[fused]))
            out.append((t, fused, dists, conf))
        return out

    def _confidence(self, domain: str, drafter: int, prob: float) -> float:
        """P(target agrees | parent accepted): calibrated, else the stated prob."""
        if self.calibration is not None:
            return self.calibration.confidence(domain, drafter, prob)
        return min(1.0, max(0.0, prob))

    def confidence(self, tree: Any, domain: str) -> np.ndarray:
        """``_confidence`` of every node (the committed root: 1)."""
        return np.array([1.0] + [self._confidence(domain, int(tree.proposers[i]), float(tree.probs[i]))
                                 for i in range(1, tree.n)])

    def guides(self, items: list[tuple[str, dict[int, tuple[list[int], list[float]]], float, int]]
               ) -> list[list[int]]:
        """(domain, chains per drafter, min reach, cap) -> the guide for the next draft op."""
        return [pick_guide(ch, lambda i, p, d=domain: self._confidence(d, i, p), min_reach, cap)
                for domain, ch, min_reach, cap in items]

    def prune(self, items: list[tuple[Any, str, float]]) -> list[tuple[Any, np.ndarray]]:
        """(tree, domain, min_gain) -> (pruned tree, kept old node indices): nodes whose
        chance of being accepted is below min_gain tokens are not worth their verify cost."""
        return [tree.prune(self.confidence(tree, domain), gain) for tree, domain, gain in items]

    def observe(self, labels: list[tuple[str, int, float, bool]]) -> None:
        """Verified candidates (domain, drafter, its prob, target agreed) teach calibration."""
        if self.calibration is not None:
            for domain, drafter, prob, agreed in labels:
                self.calibration.observe(domain, drafter, prob, agreed)

    def calibration_table(self) -> dict:
        """Calibration.table(), for the serve stats (empty when calibration is off)."""
        return self.calibration.table() if self.calibration is not None else {}


@dataclass
class DrafterSlot:
    name: str
    index: int
    proxy: Any                       # DrafterProxyActor proxy
    max_positions: int
    domains: tuple[str, ...] = ()
    alive: bool = True
    next_probe: float = 0.0
    probe: Any = None                # pending probe future
    busy_s: float = 0.0
    warm: tuple[Any, list[str]] | None = None  # background prefill in flight: (future, its rids)


@dataclass
class VerifierSlot:
    name: str
    proxy: Any
    load: int = 0
    busy_s: float = 0.0
    reserved: int = 0                # KV tokens reserved by its admitted requests (worst case)


@dataclass
class ControllerStats:
    started: float = field(default_factory=time.monotonic)
    rounds: int = 0
    tokens: int = 0
    accepted_drafts: int = 0
    requests_done: int = 0
    requests_failed: int = 0
    wall_s: float = 0.0              # time spent inside ticks with work
    verify_busy_s: float = 0.0
    draft_wall_s: float = 0.0
    overlap_s: float = 0.0
    gated_rounds: int = 0            # rounds where plain batched decoding beat speculation
    pruned_nodes: int = 0            # drafted tree nodes dropped as not worth verifying
    background_prefills: int = 0     # request prompts a model drafter prefilled off the critical path
    guided_steps: int = 0            # model-drafter proposals read off a scored guide (no forward of their own)
    stopped_chains: int = 0          # solo model-drafter chains the drafter ended early (min_reach)
    refused_drafts: int = 0          # draft batches a drafter refused (its cache mirror was stale, ...)
    rescued_rounds: int = 0          # routed rounds with no proposal that a spare model drafter drafted
    last_round: dict = field(default_factory=dict)
    # The last rounds' phases, seconds since start: (sequential draft start, end, verify
    # start, end, pipelined draft start, end, requests verified, requests drafted);
    # `stats` with timeline=N returns them (cosine-bench plots the overlap).
    timeline: deque = field(default_factory=lambda: deque(maxlen=4096))


class ControllerActor(pykka.ThreadingActor):
    """Request pool, round loop, scheduling, speculation control, stats."""

    def __init__(self, cfg: Config, verifiers: list[VerifierSlot], drafters: list[DrafterSlot], router: Any,
                 fuser: Any, emit_factory: Callable[[], Emit],
                 cost: CostModel | None = None):
        super().__init__()
        self.cfg = cfg
        self.cc = cfg.controller
        self.verifiers = verifiers
        self.drafters = drafters
        self.router = router
        self.fuser = fuser
        self.emit_factory = emit_factory
        self.emit: Emit = lambda a, h: None
        self.costs = CostBook(profile=cost or CostModel.default())
        self.spec = SpeculationController.from_config(self.cc.speculation, self.cc.scheduling.max_verify_tokens,
                                                      costs=self.costs)
        self.gated_streak: dict[str, int] = {}  # rid -> consecutive rounds the batch gate ran plain
        self.probe_gap: dict[str, int] = {}     # rid -> gated rounds before its next probe
        sc = self.cc.speculation
        self.goodput_gate = GoodputGate(sc.gate_window, sc.gate_explore_every)
        self.requests: dict[str, Request] = {}          # admitted (prefilled) requests
        self.incoming: deque[Request] = deque()
        self.by_client: dict[tuple[Any, str], str] = {}
        self.stats_ = ControllerStats()
        self.t0 = time.perf_counter()    # timeline origin
        self.tick_pending = False
        self.worker_timeout = self.cc.worker_timeout_s
        self.probe_every_s = max(1.0, min(5.0, self.worker_timeout))
        self.queue_waits = 0             # requests that had to wait in the queue for KV room
        self.prefill_s = 0.0             # drafters' prompt prefill inside the current _draft call
        self.pipelined = cfg.pipelined()
        self.background_prefill = cfg.background_prefills()
        self.model_drafters = cfg.model_drafters()
        self.engagement = Engagement() if self.cc.routing.engage_by_cost else None
        # Did the batch gate's last decision over several requests keep them plain? While it
        # does, model drafters are not engaged for more requests: their prompt prefill would
        # take CPU/GPU time from the batch's plain rounds for drafts the gate would not verify
        # (traced at concurrency 4: the 0.5B prefilled 3 prompts the gate then never drafted for).
        self.batch_plain = sc.adaptive and sc.gate != "off"
        log.info("cosine mode %s: %s", "pipelines drafting and verification" if self.pipelined else
                 "drafts then verifies in turn", f"[controller] pipeline = {cfg.controller.pipeline!r}"
                 + ("" if cfg.controller.pipeline != "auto" else
                    (" (drafters and verifiers on separate hardware)" if self.pipelined else
                     " (a drafter shares a host and device with a verifier)"))
                 + f"; model drafters prefill new prompts {'in the background' if self.background_prefill else 'inline'}")
        self.budgets = [max(1, cfg.worker(v.name).kv_budget_tokens) for v in verifiers]

    def on_start(self) -> None:
        self.emit = self.emit_factory()
        self._me = self.actor_ref.proxy()

    # -- frontend messages -------------------------------------------------------------
    def submit(self, req: Request, client_key: tuple[Any, str]) -> None:
        if client_key in self.by_client:
            self._reply_error(req.client, "duplicate_request", f"request {client_key[1]!r} is already running")
            return
        if len(self.requests) + len(self.incoming) >= self.cc.max_pending_requests:
            self._reply_error(req.client, "overloaded",
                              f"{self.cc.max_pending_requests} requests pending (max_pending_requests); retry later")
            return
        self.by_client[client_key] = req.rid
        req.client_key = client_key
        self.incoming.append(req)
        self._kick()

    def cancel(self, client_key: tuple[Any, str], reply_to: Any) -> None:
        rid = self.by_client.get(client_key)
        if rid is None:
            self.emit(reply_to[0], {"v": VERSION, "op": "cancel", "seq": reply_to[1], "ok": False,
                                    "error": {"code": "unknown_request",
                                              "message": f"no running request with rid {client_key[1]!r}"}})
            return
        req = self.requests.get(rid) or next((r for r in self.incoming if r.rid == rid), None)
        if req is not None:
            self._fail(req, "cancelled", "cancelled by the client")
        self.emit(reply_to[0], {"v": VERSION, "op": "cancel", "seq": reply_to[1], "ok": True, "rid": client_key[1]})

    def stats(self, timeline: int = 0) -> dict[str, Any]:
        s = self.stats_
        wall = max(s.wall_s, 1e-9)
        drafters = {}
        for d in self.drafters:
            drafters[d.name] = {"alive": d.alive, "busy_s": d.busy_s,
                                "idle_frac": max(0.0, 1.0 - d.busy_s / wall) if s.wall_s else None}
        return {
            "uptime_s": time.monotonic() - s.started, "mode": self.cc.mode, "pipelined": self.pipelined,
            "active_requests": len(self.requests), "queued_requests": len(self.incoming),
            "rounds": s.rounds, "tokens": s.tokens, "requests_done": s.requests_done, "gated_rounds": s.gated_rounds,
            "pruned_nodes": s.pruned_nodes, "background_prefills": s.background_prefills,
            "guided_steps": s.guided_steps, "rescued_rounds": s.rescued_rounds, "stopped_chains": s.stopped_chains,
            "refused_drafts": s.refused_drafts,
            "requests_failed": s.requests_failed,
            "mean_accepted_length": 1.0 + s.accepted_drafts / s.rounds if s.rounds else 1.0,
            "busy_wall_s": s.wall_s, "draft_wall_s": s.draft_wall_s, "verify_busy_s": s.verify_busy_s,
            "pipeline_overlap_s": s.overlap_s, "last_round": s.last_round,
            "verifier_idle_frac": max(0.0, 1.0 - s.verify_busy_s / wall) if s.wall_s else None,
            "drafter_idle_frac": (sum(v["idle_frac"] for v in drafters.values()) / len(drafters)
                                  if drafters and s.wall_s else None),
            "drafters": drafters,
            "verifiers": {v.name: {"load": v.load, "busy_s": v.busy_s, "kv_reserved": v.reserved,
                                   "kv_budget": b} for v, b in zip(self.verifiers, self.budgets)},
            "queue_waits": self.queue_waits, "gate_goodput": self.goodput_gate.snapshot(),
            # domain -> "free" or model drafter -> goodput of its rounds (engagement's evidence)
            "engagement": self.engagement.snapshot() if self.engagement is not None else {},
            # domain -> drafter -> per probability bin [agreement rate, trials] (fusion's confidence)
            "calibration": {dom: {self.drafters[d].name: [list(b) for b in bins] for d, bins in per.items()}
                            for dom, per in self.fuser.calibration_table().get().items()},
            **({"timeline": [list(r) for r in list(s.timeline)[-timeline:]]} if timeline > 0 else {}),
        }

    def worker_stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        futs = {v.name: v.proxy.stats() for v in self.verifiers}
        futs.update({d.name: d.proxy.stats() for d in self.drafters if d.alive})
        for name, f in futs.items():
            try:
                out[name] = f.get(timeout=self.worker_timeout + 1)
            except Exception as e:  # noqa: BLE001 - a dead worker is reported, not raised
                out[name] = {"error": str(e)}
        for d in self.drafters:
            if not d.alive:
                out[d.name] = {"error": "marked dead; probing"}
        return out

    def shutdown(self) -> int:
        """Fail every request still running (the server is stopping); returns how many."""
        pending = list(self.requests.values()) + list(self.incoming)
        for r in pending:
            self._fail(r, "unavailable", "the server is shutting down")
        return len(pending)

    def set_cost_model(self, cost: CostModel) -> None:
        self.costs.profile = cost

    # -- replies -----------------------------------------------------------------------
    def _reply_error(self, client: Any, code: str, message: str) -> None:
        ident, crid, seq = client
        self.emit(ident, {"v": VERSION, "op": "generate", "seq": seq, "rid": crid, "ok": False,
                          "error": {"code": code, "message": message}})

    def _fail(self, req: Request, code: str, message: str) -> None:
        if req.done and req.rid not in self.requests:
            return
        req.finish_reason = req.finish_reason or "error"
        self.stats_.requests_failed += 1
        self._reply_error(req.client, code, message)
        self._drop(req)

    def _finish(self, req: Request) -> None:
        ident, crid, seq = req.client
        st = req.stats()
        self.stats_.requests_done += 1
        self.emit(ident, {"v": VERSION, "op": "done", "seq": seq, "rid": crid, "ok": True, "text": req.text,
                          "token_ids": list(req.output), "finish_reason": req.finish_reason, "stats": st})
        self._drop(req)

    def _drop(self, req: Request) -> None:
        """Forget a request everywhere and free its caches on every worker that holds it."""
        self.by_client.pop(req.client_key, None)
        if req in self.incoming:
            self.incoming.remove(req)
        if self.requests.pop(req.rid, None) is not None:
            v = self.verifiers[req.verifier]
            v.load -= 1
            v.reserved -= req.kv_reserved
            v.proxy.release([req.rid])
            for d in self.drafters:
                d.proxy.release([req.rid])
            self.router.finish([req.rid])
            self.spec.forget(req.rid)
            self.gated_streak.pop(req.rid, None)
            self.probe_gap.pop(req.rid, None)

    # -- the round loop ----------------------------------------------------------------
    def _kick(self) -> None:
        if not self.tick_pending:
            self.tick_pending = True
            self._me.tick()

    def tick(self) -> None:
        self.tick_pending = False
        try:
            self._tick()
        except Exception:  # noqa: BLE001 - a bug must fail requests, not kill the server silently
            log.exception("round failed; failing its requests")
            for r in list(self.requests.values()) + list(self.incoming):
                self._fail(r, "internal", "internal error in the controller round; see the server log")
        if self.requests or self.incoming:
            self._kick()

    def _tick(self) -> None:
        t_start = time.perf_counter()
        tokens_before = self.stats_.tokens
        self._probe_drafters()
        self._expire()
        if self._admit():
            # Requests that arrived during this admission prefill wait in the actor's inbox.
            # End the tick so that the next one admits them before anyone's round is planned:
            # else the first of a burst, seemingly alone, engaged the model drafter (its
            # prefill made the others wait 1 s more) and then ran plain in the batch.
            self.stats_.wall_s += time.perf_counter() - t_start
            return
        self._warm()
        if not self.requests:
            return
        reqs = list(self.requests.values())
        plans = self._plans([r for r in reqs if r.phase == "draft"])
        # cosine requests pipeline; one that does not speculate this round (no live drafter,
        # speculation switched off) is verified right away like the sequential modes
        pipelined = [r for r in reqs if self.pipelined and r.params.mode is Mode.COSINE
                     and (r.phase == "verify" or plans[r.rid].speculate)]
        sequential = [r for r in reqs if r not in pipelined]

        # Which requests verify this round: those holding a tree plus the sequential ones
        # (they draft right before). The scheduler keeps the round under its caps.
        candidates = [r for r in pipelined if r.phase == "verify"] + sequential
        chosen = self._schedule(candidates, plans)
        seq_now = [r for r in sequential if r.rid in chosen]
        t0 = time.perf_counter()
        self.prefill_s = 0.0
        self._draft(seq_now, plans)
        seq_draft_s = time.perf_counter() - t0
        for r in seq_now:
            r.draft_s, r.draft_overlap_s = max(0.0, seq_draft_s - self.prefill_s), 0.0
        verify_set = [r for r in candidates if r.rid in chosen]
        t_verify = time.perf_counter()
        futures = self._issue_verify(verify_set)

        # Pipelining: draft the other group while the verifier works. Balance the groups:
        # when far more requests wait to draft than to verify, hold some back a round.
        to_draft = [r for r in pipelined if r.phase == "draft"]
        hold = max(0, (len(to_draft) - len(verify_set)) // 2) if len(to_draft) > 1 else 0
        to_draft = to_draft[:len(to_draft) - hold]
        t1 = time.perf_counter()
        self.prefill_s = 0.0
        self._draft(to_draft, plans)
        draft_s = time.perf_counter() - t1 if to_draft else 0.0
        verify_busy = self._collect_verify(futures)
        for r in to_draft:
            r.draft_s = max(0.0, draft_s - self.prefill_s)
            r.draft_overlap_s = min(r.draft_s, verify_busy)

        wall = time.perf_counter() - t_start
        s = self.stats_
        s.wall_s += wall
        if any(r.params.mode is Mode.COSINE for r in reqs):
            self.goodput_gate.observe(s.tokens - tokens_before, wall)
        s.verify_busy_s += verify_busy
        s.draft_wall_s += draft_s + seq_draft_s
        # drafting that ran while the verifier was busy: what pipelining saved this round
        s.overlap_s += max(0.0, min(draft_s, verify_busy))
        base = t_start - self.t0
        at = lambda t: round(base + t - t_start, 6)  # noqa: E731
        s.timeline.append((at(t0), at(t0 + seq_draft_s), at(t_verify), at(t_verify + verify_busy),
                           at(t1), at(t1 + draft_s), len(verify_set), len(to_draft) + len(seq_now)))
        s.last_round = {"wall_s": wall, "verify_s": verify_busy, "draft_s": draft_s + seq_draft_s,
                        "verified": len(verify_set), "drafted": len(to_draft) + len(seq_now),
                        "held_back": hold, "verifier_idle_frac": max(0.0, 1.0 - verify_busy / max(wall, 1e-9))}
        # Pipeline feedback only from rounds that pipelined (both groups present): with one
        # group the verifier's wait is structural and drafting more would not fill it.
        if self.cc.speculation.adaptive and verify_set and to_draft:
            idle = max(0.0, 1.0 - verify_busy / max(wall, 1e-9))
            queued = len([r for r in self.requests.values() if r.phase == "verify"])
            self.spec.observe_pipeline(idle, queued)

    def _probe_drafters(self) -> None:
        now = time.monotonic()
        for d in self.drafters:
            if d.alive:
                continue
            if d.probe is not None:
                try:
                    ok = d.probe.get(timeout=0)
                except pykka.Timeout:
                    continue
                d.probe = None
                if ok:
                    d.alive = True
                    for r in self.requests.values():  # it holds no prompt now: prefill afresh
                        r.warmed.discard(d.name)
                    log.info("drafter %s answers again; re-admitted (its cache starts empty)", d.name)
                    continue
                d.next_probe = now + self.probe_every_s
            elif now >= d.next_probe:
                d.probe = d.proxy.probe(min(1.0, self.worker_timeout))

    def _warm(self) -> None:
        """Background drafter prefill (cosine mode): a model drafter prefills the prompts of
        new requests in one op while the rounds go on; until it is done, those requests
        draft with the other drafters (``_usable``). Its prompt prefill thus overlaps the
        target's verification instead of delaying every new request's first round."""
        if not self.background_prefill:
            return
        for d in self.drafters:
            if d.warm is not None:
                fut, rids = d.warm
                try:
                    res: Timed = fut.get(timeout=0)
                except pykka.Timeout:
                    continue
                d.warm = None
                d.busy_s += res.busy_s
                if res.error == "dead":
                    self._mark_dead(d, res.message)
                    continue
                if res.error:  # those requests prefill inline in their first draft op instead
                    log.warning("drafter %s refused a background prefill (%s)", d.name, res.message)
                elif res.value:
                    self.stats_.background_prefills += len(rids)
                    self.costs.observe_prefill(res.busy_s, res.value)
                for rid in rids:
                    if rid in self.requests:
                        self.requests[rid].warmed.add(d.name)
            if d.warm is None and d.alive and d.probe is None and d.name in self.model_drafters:
                todo = [r for r in self.requests.values() if r.params.mode is Mode.COSINE and d.name not in r.warmed
                        and (not r.params.drafters or d.name in r.params.drafters)
                        and self._fits(d, len(r.committed), 1) and self._engaged(r, d)]
                if todo:
                    d.warm = (d.proxy.warm([(r.rid, list(r.committed)) for r in todo]), [r.rid for r in todo])

    def _engaged(self, r: Request, d: DrafterSlot) -> bool:
        """May model drafter ``d`` draft for cosine request ``r``? Once engaged it stays (its
        prompt prefill is paid); a pinned drafter is always engaged. While the batch gate keeps
        several requests plain, engaging waits (``batch_plain``)."""
        if d.name in r.engaged or d.name not in self.model_drafters:
            return True
        if self.batch_plain and len(self.requests) > 1 and d.name not in r.params.drafters:
            return False  # deferred, not declined: decided again once the gate opens or r is alone
        if self.engagement is None:
            r.engaged.add(d.name)
            return True
        pf = self.costs.prefill_token_s * len(r.committed) if self.costs.prefill_token_s is not None else 0.0
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

    def _warming(self, r: Request, d: DrafterSlot) -> bool:
        """Is ``d`` busy with a background prefill, or still to prefill ``r``'s prompt?"""
        return (self.background_prefill and r.params.mode is Mode.COSINE and d.name in self.model_drafters
                and (d.warm is not None or d.name not in r.warmed))

    def _mark_dead(self, d: DrafterSlot, why: str) -> None:
        if d.alive:
            log.warning("drafter %s marked dead (%s); continuing without it and probing it every %.0f s",
                        d.name, why, self.probe_every_s)
        d.alive = False
        d.next_probe = time.monotonic() + self.probe_every_s

    def _expire(self) -> None:
        limit = self.cc.request_timeout_s
        now = time.monotonic()
        for r in list(self.requests.values()) + list(self.incoming):
            if now - r.arrived > limit:
                where = "running" if r.rid in self.requests else "waiting in the queue for KV room"
                self._fail(r, "timeout", f"request exceeded request_timeout_s = {limit} s ({where} after "
                                         f"{len(r.output)} tokens); its caches were released")

    def _kv_need(self, r: Request, i: int) -> int:
        """Worst-case KV tokens of a request on verifier i: prompt + all its output (up to the
        context) + the largest pending tree; capped at the budget so a huge request still
        runs, alone."""
        final = min(len(r.prompt) + r.params.max_tokens, r.context_limit)
        return min(self.budgets[i], final + self.cfg.limits.max_tree_nodes)

    def _place(self, r: Request) -> int | None:
        """The verifier with the most free KV budget that has room for ``r``'s worst case
        (an idle verifier always has room), or None: then it waits in the queue."""
        best, free_best = None, -1
        for i, v in enumerate(self.verifiers):
            free = self.budgets[i] - v.reserved
            if (self._kv_need(r, i) <= free or v.load == 0) and free > free_best:
                best, free_best = i, free
        return best

    def _admit(self) -> int:
        """Admission control (backpressure): a request is prefilled only once a verifier has
        KV room for its worst case, so admitted requests never run out of cache mid-way.
        The rest wait in FIFO order in ``incoming`` (bounded by max_pending_requests,
        timed out by request_timeout_s). Returns how many requests were prefilled."""
        if not self.incoming:
            return 0
        by_v: dict[int, list[Request]] = defaultdict(list)
        # One prefill op per tick holds at most max_prefill_tokens prompt tokens (at least one
        # request): a burst of long prompts must not become one forward that outlasts
        # worker_timeout_s (16 x 128 tokens took over 30 s for the 1.5B on 2 CPU cores).
        budget = self.cc.scheduling.max_prefill_tokens
        while self.incoming and (budget > 0 or not by_v):
            i = self._place(self.incoming[0])
            if i is None:  # head of line waits: later (smaller) requests must not starve it
                r = self.incoming[0]
                if not r.queued:
                    r.queued = True
                    self.queue_waits += 1
                break
            r = self.incoming.popleft()
            r.verifier = i
            r.kv_reserved = self._kv_need(r, i)
            self.verifiers[i].load += 1
            self.verifiers[i].reserved += r.kv_reserved
            by_v[r.verifier].append(r)
            budget -= len(r.prompt)
        futs = {i: self.verifiers[i].proxy.prefill([(r.rid, r.prompt[:-1]) for r in rs]) for i, rs in by_v.items()}
        admitted = 0
        for i, rs in by_v.items():
            res: Timed = futs[i].get()
            if res.error == "soft" and len(rs) > 1:  # isolate the bad request: one by one
                results = [(r, self.verifiers[i].proxy.prefill([(r.rid, r.prompt[:-1])]).get()) for r in rs]
            else:
                results = [(r, res) for r in rs]
            for r, res1 in results:
                if res1.error is None:
                    r.prefilled = True
                    self.requests[r.rid] = r
                    r.domain = self.router.start_request(r.rid, r.prompt_text).get()
                    admitted += 1
                    continue
                self.verifiers[i].load -= 1
                self.verifiers[i].reserved -= r.kv_reserved
                if res1.extra.get("code") == "capacity" and self.verifiers[i].load > 0:
                    # the worker has less room than reserved for (e.g. it is shared): wait
                    r.verifier, r.kv_reserved = 0, 0
                    self.incoming.appendleft(r)
                    continue
                code = {"too_long": "too_long", "capacity": "overloaded"}.get(res1.extra.get("code"), "unavailable"
                                                                             if res1.error == "dead" else "internal")
                self.by_client.pop(r.client_key, None)
                self.stats_.requests_failed += 1
                self._reply_error(r.client, code, f"prefill on verifier {self.verifiers[i].name} failed: {res1.message}")
        return admitted

    # -- planning and scheduling -------------------------------------------------------
    def _room(self, r: Request) -> int:
        """Draft tokens that still fit: positions and the remaining output budget."""
        return max(0, min(r.context_limit - len(r.committed), r.params.max_tokens - len(r.output)))

    def _gate(self, reqs: list[Request], plans: dict[str, DraftPlan], width: int) -> dict[str, DraftPlan]:
        """Plain batched decoding for this round's cosine requests when, by the cost model
        (measured verify calls and draft steps; the start-up profile before those exist),
        speculation would commit fewer tokens per second (under load)."""
        cos = [r.rid for r in reqs if r.params.mode is Mode.COSINE and self.cc.speculation.adaptive
               and plans[r.rid].speculate]
        gate = self.cc.speculation.gate
        if not cos or gate == "off":
            if any(r.params.mode is Mode.COSINE for r in reqs):  # none could draft: the gate has nothing
                self.batch_plain = False                       # to weigh, so engagement must not wait on it
            return plans
        if gate == "model" and len(plans) == 1:
            # One request alone has no batch to decode plainly with: its own off-switch
            # (SpeculationController, from its measured rounds) decides. Gating it on the
            # global priors before it ever drafted would keep it plain for good.
            return plans
        seq = max(len(r.committed) for r in reqs)
        wide = {rid: DraftPlan(p.speculate, p.draft_len, p.tree_width * width) for rid, p in plans.items()}
        B, S = len(plans), len(cos)  # the batch verifies together; the S speculating requests draft together

        measured = self.costs.calls_measured()
        step = self.spec.draft_step_global

        def model_says() -> bool:
            verify = (self.costs.call_verify_s if measured else
                      (lambda n: self.costs.profile.verify_s(B, max(1, round(n / B)), seq)))
            draft = (lambda k: step * k) if step is not None else (lambda k: self.costs.profile.draft_s(S, k, seq))
            fresh = sum(len(r.committed) for r in reqs if r.rid in cos and not r.drafted)
            return speculation_pays(wide, {rid: self.spec.rates(rid) for rid in cos}, verify, draft,
                                    self.cc.speculation.disable_below_ratio,
                                    fresh * (self.costs.prefill_token_s or 0.0) / self.spec.probe_every)

        if gate == "measured":  # the measured gate explores by itself: no per-request probes
            self.batch_plain = not self.goodput_gate.decide(len(self.requests), model_says)
            if not self.batch_plain:
                return plans
            self.stats_.gated_rounds += 1
            return {rid: (DraftPlan(False, 0, 1) if rid in cos else p) for rid, p in plans.items()}
        self.batch_plain = not model_says()
        if not self.batch_plain:
            for rid in cos:
                self.gated_streak.pop(rid, None)
                self.probe_gap.pop(rid, None)
            return plans
        self.stats_.gated_rounds += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug("gate: plain round for %s (rates %s, draft step %s, prefill/token %s, measured line %s)",
                      cos, {rid: self.spec.rates(rid) for rid in cos}, step, self.costs.prefill_token_s, measured)
        # A gated request learns nothing about its acceptance rate, so after probe_every
        # gated rounds it speculates once anyway (else one pessimistic estimate would lock
        # it out). A probe that changes nothing doubles the wait for the next (up to 8x):
        # under steady load the probes' cost shrinks towards nothing.
        out = dict(plans)
        every = self.spec.probe_every
        by_rid = {r.rid: r for r in reqs}
        for rid in cos:
            n = self.gated_streak[rid] = self.gated_streak.get(rid, 0) + 1
            gap = self.probe_gap.get(rid, every)
            if n < gap or not by_rid[rid].drafted:  # a request that never drafted has nothing to refresh
                out[rid] = DraftPlan(False, 0, 1)
            else:
                self.gated_streak[rid] = 0
                self.probe_gap[rid] = min(8 * every, 2 * gap)
        return out

    def _plans(self, reqs: list[Request]) -> dict[str, DraftPlan]:
        sc = self.cc.speculation
        plans: dict[str, DraftPlan] = {}
        for r in reqs:
            mode = r.params.mode
            if mode is Mode.AUTOREGRESSIVE or not self._usable(r):
                plans[r.rid] = DraftPlan(False, 0, 1)
            elif mode is Mode.COSINE and sc.adaptive:
                plans[r.rid] = self.spec.plan(r.rid, r.domain)
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("plan rid=%s %s %s", r.rid, plans[r.rid], self.spec.explain(r.rid))
            else:
                plans[r.rid] = DraftPlan(True, sc.draft_len, sc.tree_width)
        n_alive = max(1, sum(d.alive for d in self.drafters))
        if plans:
            k = min(n_alive, self.cc.routing.max_drafters_per_request)
            plans = self.spec.trim_to_cap(plans, lambda p: 1 + p.draft_len * p.tree_width * k if p.speculate else 1)
            plans = self._gate(reqs, plans, k)
        max_nodes = self.cfg.limits.max_tree_nodes
        for r in reqs:
            p = plans[r.rid]
            # every draft step adds up to one node per drafter (times the width for expansions)
            n_use = max(1, len(self._usable(r)))
            per_step = {Mode.SPECULATIVE: 1, Mode.SPECINFER: n_use * max(1, p.tree_width),
                        Mode.COSINE: min(n_use, self.cc.routing.max_drafters_per_request)}.get(r.params.mode, 1)
            n = min(p.draft_len, self._room(r), (max_nodes - 1) // per_step) if p.speculate else 0
            width = 1 if r.params.temperature > 0 else p.tree_width
            plans[r.rid] = DraftPlan(n > 0, n, width)
        return plans

    def _schedule(self, cands: list[Request], plans: dict[str, DraftPlan]) -> set[str]:
        if not cands:
            return set()
        now = time.monotonic()
        pool = []
        for r in cands:
            planned = r.tree.n if r.tree is not None else 1 + (plans[r.rid].draft_len if r.rid in plans else 0) * \
                max(1, len(self.drafters) if r.params.mode is Mode.SPECINFER else 1)
            pool.append(PendingRequest(rid=r.rid, seq_len=len(r.committed), planned_tokens=planned,
                                       waiting_s=now - r.wait_since, cache_tokens=len(r.committed) + planned))
        sch = self.cc.scheduling
        budget = sum(self.cfg.worker(v.name).kv_budget_tokens for v in self.verifiers)
        chosen = select_batch(pool, self.costs.profile, max_batch=sch.max_batch * len(self.verifiers),
                              max_verify_tokens=sch.max_verify_tokens * len(self.verifiers),
                              memory_budget_tokens=budget, latency_weight=sch.latency_weight,
                              latency_bound_s=sch.latency_bound_ms / 1000.0 if sch.latency_bound_ms else None)
        ids = {c if isinstance(c, str) else c.rid for c in chosen}
        if not ids:  # never starve: the oldest request always goes
            ids = {max(pool, key=lambda p: p.waiting_s).rid}
        return ids

    # -- drafting ------------------------------------------------------------------------
    def _alive(self) -> list[DrafterSlot]:
        return [d for d in self.drafters if d.alive]

    def _usable(self, r: Request) -> list[DrafterSlot]:
        """Alive drafters this request may use (GenParams.drafters pins a subset)."""
        pin = r.params.drafters
        return [d for d in self.drafters if d.alive and (not pin or d.name in pin)
                and (r.params.mode is not Mode.COSINE or self._engaged(r, d) and not self._warming(r, d))]

    def _draft(self, reqs: list[Request], plans: dict[str, DraftPlan]) -> None:
        """Build ``r.tree`` for every request (root only when it does not speculate)."""
        if not reqs:
            return
        fused = [r for r in reqs if r.params.mode is Mode.COSINE and plans[r.rid].speculate]
        chains = [r for r in reqs if r.params.mode in (Mode.SPECULATIVE, Mode.SPECINFER) and plans[r.rid].speculate]
        for r in reqs:
            r.tree, r.draft_dists, r.drafters, r.proposals = rounds.root_tree(r.committed[-1]), {}, [], {}
            r.cands = []
            r.drafted = r.drafted or plans[r.rid].speculate
            r.phase = "verify"
            r.wait_since = time.monotonic()
        if chains:
            self._draft_chains(chains, plans)
        if fused:
            self._draft_fused(fused, plans)
            self._rescue(fused, plans)
            self._prune(fused)

    def _job(self, r: Request, context: list[int], k: int, topk: int = 1, forced: list[int] | None = None,
             min_reach: list[float] | None = None) -> DraftJob:
        stochastic = r.params.temperature > 0
        return DraftJob(rid=r.rid, context=context, k=k, topk=topk, temperature=r.params.temperature,
                        return_probs=stochastic, seed=int(r.rng.integers(2 ** 31)) if stochastic else None,
                        forced=forced, min_reach=min_reach)

    def _chain_stops(self, r: Request, k: int) -> list[float] | None:
        """A routed solo chain drafts in one op, so the fused early stop cannot end it step by
        step here: the drafter ends it itself after step j once the product of its tokens'
        probabilities is below step floor / P(position j + 2 accepted), the same rule in its
        own probabilities. Traced on docs: 8-step chains (0.2 s) pruned to 1-3 nodes."""
        floor = self._step_floor(r) if self._prunes(r) else 0.0
        if floor <= 0.0:
            return None
        return [min(1.0, floor / max(self.spec.rate_at(r.rid, j + 2), 1e-6)) for j in range(k)]

    def _run_drafts(self, jobs: dict[int, list[DraftJob]]) -> dict[int, dict[str, DraftOut]]:
        """One draft op per drafter, all in flight at once; failed drafters are marked dead."""
        futs = {i: self.drafters[i].proxy.draft(js) for i, js in jobs.items() if js}
        out: dict[int, dict[str, DraftOut]] = {}
        for i, f in futs.items():
            d = self.drafters[i]
            res: Timed = f.get()
            d.busy_s += res.busy_s
            self.prefill_s = max(self.prefill_s, res.extra.get("prefill_s", 0.0))
            n_pre = res.extra.get("prefill_tokens", 0)
            if n_pre and d.name in self.model_drafters:  # the drafter that bounds prefill time
                self.costs.observe_prefill(res.extra["prefill_s"], n_pre)
            if res.error == "dead":
                self._mark_dead(d, res.message)
            elif res.error:
                self.stats_.refused_drafts += 1
                log.warning("drafter %s refused a draft batch (%s); those requests go without it this step",
                            d.name, res.message)
            else:
                out[i] = res.value
        return out

    def _fits(self, d: DrafterSlot, context_len: int, k: int) -> bool:
        return context_len + k <= d.max_positions

    def _draft_chains(self, reqs: list[Request], plans: dict[str, DraftPlan],
                      pick: dict[str, list[DrafterSlot]] | None = None) -> None:
        """One multi-step draft op per drafter: the first usable drafter (speculative), all
        of them (specinfer), or the ones in ``pick`` (a cosine request routed to one)."""
        jobs: dict[int, list[DraftJob]] = defaultdict(list)
        stopping: set[tuple[int, str]] = set()  # (drafter, rid) chains that may end early
        for r in reqs:
            p = plans[r.rid]
            cand = pick[r.rid] if pick is not None else self._usable(r)
            alive = [d for d in cand if d.alive and self._fits(d, len(r.committed), p.draft_len)]
            use = alive[:1] if r.params.mode is Mode.SPECULATIVE else alive
            stops = self._chain_stops(r, p.draft_len) if pick is not None else None
            for d in use:
                stop = stops if d.name in self.model_drafters else None
                jobs[d.index].append(self._job(r, list(r.committed), p.draft_len, p.tree_width, min_reach=stop))
                if stop is not None:
                    stopping.add((d.index, r.rid))
        outs = self._run_drafts(jobs)
        self.stats_.stopped_chains += sum(len(res[rid].tokens) < plans[rid].draft_len
                                          for i, res in outs.items() for rid in res if (i, rid) in stopping)
        for r in reqs:
            chains = []
            for i, res in outs.items():
                o = res.get(r.rid)
                if o is None:
                    continue
                chains.append(rounds.ChainDraft(i, o.tokens, o.probs, o.topk_ids, o.topk_probs, o.dists))
                r.drafters.append(self.drafters[i].name)
                r.proposals[self.drafters[i].name] = (o.tokens, o.probs)
            if chains:
                d = rounds.chains_tree(r.committed[-1], chains, r.params.temperature > 0, plans[r.rid].tree_width)
                r.tree, r.draft_dists = d.tree, d.dists
                if pick is not None:  # a routed solo chain: every node is one of its candidates
                    t = r.tree
                    r.cands.extend((int(t.proposers[n]), float(t.probs[n]), int(t.tokens[n]), int(t.parents[n]))
                                   for n in range(1, t.n))

    def _draft_fused(self, reqs: list[Request], plans: dict[str, DraftPlan]) -> None:
        """CoSine drafting: per step, every selected drafter proposes one token after the same
        fused prefix; the most confident becomes the fused token all continue from. With
        guided drafting one draft op covers several steps (control/guide.py)."""
        k_max = self.cc.routing.max_drafters_per_request
        # The anchor (routing.anchor_model) is for a request that has the verifier to itself:
        # under load the batch gate weighs drafting against plain batched steps, and the
        # scores alone pick (measured at concurrency 4: 0.82x plain decoding anchored).
        alone = len(self.requests) == 1
        sel = self.router.select([(r.rid, k_max, {d.name for d in self._usable(r)}) for r in reqs], alone).get()
        by_name = {d.name: d for d in self.drafters}
        for r in reqs:
            r.routed = [n for n in sel.get(r.rid, []) if n in by_name]
        weights: dict[str, dict[int, float] | None] = {r.rid: None for r in reqs}
        if self.cc.fusion.weight_by_router:
            for rid, sc in self.router.scores([r.rid for r in reqs]).get().items():
                weights[rid] = {by_name[n].index: s for n, s in sc.items() if n in by_name}
        # A request routed to a single drafter has nothing to fuse: one multi-step draft op
        # gives the same chain as k fused steps, for one round trip instead of k.
        solo = {r.rid: [by_name[n] for n in sel.get(r.rid, []) if n in by_name] for r in reqs}
        solo = {rid: ds for rid, ds in solo.items() if len(ds) == 1}
        if solo:  # its chain expands the same top-`siblings` leaves as a fused step would
            flat = {r.rid: DraftPlan(plans[r.rid].speculate, plans[r.rid].draft_len, self._siblings(r))
                    for r in reqs if r.rid in solo}
            self._draft_chains([r for r in reqs if r.rid in solo], flat, pick=solo)
            reqs = [r for r in reqs if r.rid not in solo]
        state = {}
        for r in reqs:
            r.drafters = list(r.routed)
            r.proposals = {n: ([], []) for n in r.routed}
            # reach: P(the fused path so far is accepted); a step is drafted only while its
            # expected gain, reach * P(next position accepted), is worth its cost.
            # guide: forced tokens for the model drafters' next op (guided drafting).
            state[r.rid] = {"parent": 0, "prefix": [], "left": plans[r.rid].draft_len, "reach": 1.0,
                            "floor": self._step_floor(r), "guide": []}
        while True:
            jobs: dict[int, list[DraftJob]] = defaultdict(list)
            asked: dict[str, dict[int, list[int] | None]] = {}  # rid -> drafter index -> its forced tokens
            live = [r for r in reqs if state[r.rid]["left"] > 0]
            for r in live:
                st = state[r.rid]
                st["start"] = len(st["prefix"])
                ctx = r.committed + st["prefix"]
                # Greedy only: a sampled step must be drawn after the fused prefix is known.
                chain_k = st["left"] if self._guides(r) else 1
                guide = st["guide"][:st["left"] - 1]
                asked[r.rid] = {}
                for n in r.drafters:
                    d = by_name[n]
                    model = d.name in self.model_drafters
                    k = len(guide) + 1 if model else chain_k
                    if d.alive and self._fits(d, len(ctx), k):
                        forced = guide + [-1] if model and guide else None
                        jobs[d.index].append(self._job(r, ctx, k, topk=self._siblings(r), forced=forced))
                        asked[r.rid][d.index] = forced
            if not jobs:
                break
            outs = self._run_drafts(jobs)
            got = {r.rid: {i: res[r.rid] for i, res in outs.items() if r.rid in res} for r in live}
            # Replay the op's steps, all requests in lockstep (one fusion call per step). A
            # request goes on to the next step only while every drafter it asked still holds
            # a proposal made on the fused prefix, so each step fuses a full candidate set.
            step = 0
            while live:
                items, order = [], []
                for r in live:
                    cands = []
                    for i, o in got[r.rid].items():
                        f = asked[r.rid][i]
                        own = f is not None and f[step] >= 0  # a scored guide token: its own pick is topk[0]
                        self.stats_.guided_steps += own
                        tok = int(o.topk_ids[step][0]) if own else int(o.tokens[step])
                        prob = float(o.topk_probs[step][0]) if own else float(o.probs[step])
                        q = o.dists[step] if o.dists is not None else None
                        cands.append((i, tok, prob, q))
                        r.cands.append((i, prob, tok, state[r.rid]["parent"]))
                        toks, probs = r.proposals[self.drafters[i].name]
                        toks.append(tok)
                        probs.append(prob)
                        for alt, ap in zip(o.topk_ids[step][1:], o.topk_probs[step][1:]):  # runners-up
                            if alt >= 0 and alt != tok:
                                cands.append((i, int(alt), float(ap), None))
                                r.cands.append((i, float(ap), int(alt), state[r.rid]["parent"]))
                    if not cands:
                        state[r.rid]["left"] = 0
                        continue
                    items.append((r.tree, state[r.rid]["parent"], cands, r.params.temperature > 0,
                                  weights[r.rid], r.domain))
                    order.append(r)
                if not items:
                    break
                nxt = []
                for r, (tree, node, dists, conf) in zip(order, self.fuser.fuse(items).get()):
                    st = state[r.rid]
                    r.tree = tree
                    r.draft_dists.update(dists)
                    if node is None:
                        st["left"] = 0
                        continue
                    fused = int(tree.tokens[node])
                    st["parent"] = node
                    st["prefix"].append(fused)
                    st["left"] -= 1
                    st["reach"] *= conf
                    # the next position's acceptance, given this one is accepted
                    if st["reach"] * self.spec.rate_at(r.rid, len(st["prefix"]) + 1) < st["floor"]:
                        st["left"] = 0
                    got[r.rid] = {i: o for i, o in got[r.rid].items() if still_valid(o.tokens, step, fused)}
                    if st["left"] > 0 and got[r.rid].keys() == asked[r.rid].keys():
                        nxt.append(r)
                live = nxt
                step += 1
            # The weight-free chains that the fused path still follows guide the next op.
            chains = []
            for r in reqs:
                st = state[r.rid]
                st["guide"] = []
                if st["left"] > 1 and self._guides(r) and r.rid in got:
                    done = len(st["prefix"]) - st["start"]  # steps replayed from this op
                    ch = {i: (o.tokens[done:], o.probs[done:]) for i, o in got[r.rid].items()
                          if self.drafters[i].name not in self.model_drafters}
                    if ch:
                        chains.append((r, ch))
            if chains:
                guides = self.fuser.guides([(r.domain, ch, self.cc.fusion.guide_min_reach, state[r.rid]["left"] - 1)
                                            for r, ch in chains]).get()
                for (r, _), g in zip(chains, guides):
                    state[r.rid]["guide"] = g

    def _rescue(self, reqs: list[Request], plans: dict[str, DraftPlan]) -> None:
        """A routed round whose drafters proposed nothing (a prompt-lookup drafter with no
        match) would verify the root alone, a plain decoding step. Give it to an engaged
        model drafter the router did not pick this round: its chain usually brings more
        than its draft costs, and its verified candidates update the router."""
        pick = {}
        for r in reqs:
            if r.tree is None or r.tree.n > 1 or not plans[r.rid].speculate:
                continue
            spare = [d for d in self._usable(r) if d.name in self.model_drafters and d.name not in r.routed
                     and self._fits(d, len(r.committed), plans[r.rid].draft_len)]
            if spare:
                pick[r.rid] = spare[:1]
        if pick:
            flat = {rid: DraftPlan(p.speculate, p.draft_len, 1) for rid, p in plans.items()}
            self._draft_chains([r for r in reqs if r.rid in pick], flat, pick=pick)
            self.stats_.rescued_rounds += len(pick)
            log.debug("rescue: %s drafted by %s (the routed drafters proposed nothing)",
                      sorted(pick), {rid: ds[0].name for rid, ds in pick.items()})

    def _siblings(self, r: Request) -> int:
        """Top-k candidates per drafter and fused step: greedy only (a sampled step is one
        draw per drafter, tested against its own q)."""
        return self.cc.fusion.siblings if r.params.temperature <= 0 else 1

    def _guides(self, r: Request) -> bool:
        """Guided drafting for this request: greedy, and on in the config."""
        return self.cc.fusion.guide and r.params.temperature <= 0

    def _step_floor(self, r: Request) -> float:
        """Fewest expected tokens one more fused draft step must bring (0 = no early stop)."""
        sc = self.cc.speculation
        return self.spec.gain_floors(r.rid)[1] if sc.prune and sc.adaptive else 0.0

    def _prunes(self, r: Request) -> bool:
        """Cosine-mode greedy requests drop tree nodes not worth verifying. Sampling keeps
        every candidate: dropping a sample for its own low probability would bias the
        distribution multi-step speculative sampling relies on."""
        sc = self.cc.speculation
        return sc.prune and sc.adaptive and r.params.mode is Mode.COSINE and r.params.temperature <= 0

    def _prune(self, reqs: list[Request]) -> None:
        """Drop each tree's nodes whose acceptance chance is below the node gain floor;
        candidate labels follow the renumbering (a dropped candidate whose parent stays
        is still labelled: the target scores its parent either way)."""
        todo = [(r, self.spec.gain_floors(r.rid)[0]) for r in reqs
                if self._prunes(r) and r.tree is not None and r.tree.n > 2]
        todo = [(r, g) for r, g in todo if g > 0.0]
        if not todo:
            return
        out = self.fuser.prune([(r.tree, r.domain, g) for r, g in todo]).get()
        for (r, _), (tree, kept) in zip(todo, out):
            if tree.n == r.tree.n:
                continue
            new = {int(o): i for i, o in enumerate(kept)}
            self.stats_.pruned_nodes += r.tree.n - tree.n
            r.tree = tree
            r.cands = [(d, p, t, new[u]) for d, p, t, u in r.cands if u in new]

    # -- verification --------------------------------------------------------------------
    def _issue_verify(self, reqs: list[Request]) -> dict[int, tuple[list[Request], Any, bool]]:
        by_v: dict[int, list[Request]] = defaultdict(list)
        for r in reqs:
            by_v[r.verifier].append(r)
        futs = {}
        for i, rs in by_v.items():
            logits = any(r.params.temperature > 0 for r in rs)
            items = [(r.rid, np.asarray(r.tree.tokens, np.int32), np.asarray(r.tree.parents, np.int32),
                      r.commit_nodes) for r in rs]
            futs[i] = (rs, self.verifiers[i].proxy.verify(items, logits), logits)
        return futs

    def _collect_verify(self, futs: dict[int, tuple[list[Request], Any, bool]]) -> float:
        busy = 0.0
        for i, (rs, fut, logits) in futs.items():
            v = self.verifiers[i]
            res: Timed = fut.get()
            if res.error == "soft" and len(rs) > 1:
                # one bad request fails the whole batch and changes nothing: isolate it
                log.warning("verify batch on %s refused (%s); retrying one by one", v.name, res.message)
                for r in rs:
                    f1 = self._issue_verify_one(i, r, logits)
                    busy += self._apply_verify(v, [r], f1.get())
                continue
            busy += self._apply_verify(v, rs, res)
        return busy

    def _issue_verify_one(self, i: int, r: Request, logits: bool) -> Any:
        item = (r.rid, np.asarray(r.tree.tokens, np.int32), np.asarray(r.tree.parents, np.int32),
                r.commit_nodes)
        return self.verifiers[i].proxy.verify([item], logits)

    def _apply_verify(self, v: VerifierSlot, rs: list[Request], res: Timed) -> float:
        v.busy_s += res.busy_s
        if not res.error:
            self.costs.observe_call(sum(r.tree.n for r in rs), res.busy_s)
        if res.error:
            code = "unavailable" if res.error == "dead" else {"too_long": "too_long", "capacity": "overloaded"}.get(
                res.extra.get("code"), "internal")
            for r in rs:
                self._fail(r, code, f"verification on {v.name} failed: {res.message}")
            return res.busy_s
        n_total = sum(r.tree.n for r in rs)
        upd, rnd, finished, cal = [], [], [], []
        for r in rs:
            argmax, logits = res.value[r.rid]
            try:
                vr = rounds.verify(r.tree, argmax, logits, r.params.temperature, r.params.top_p, r.draft_dists,
                                   r.rng)
            except Exception:  # noqa: BLE001 - one request's bad numbers must not fail the whole round
                log.exception("verification of request %s failed; failing that request only", r.rid)
                self._fail(r, "internal", "verification failed on the server (see its log)")
                continue
            tokens = [int(t) for t in vr.tokens]
            n_acc = len(tokens) - 1
            r.rounds += 1
            r.accepted_drafts += n_acc
            self.stats_.rounds += 1
            self.stats_.accepted_drafts += n_acc
            drafted = r.tree.n - 1
            if r.cands:
                # Routed rounds: each drafter is scored by per-position agreement with the
                # target over all its candidates, and the labels calibrate fusion.
                labels = rounds.agreement(r.cands, argmax)
                per: dict[int, list[float]] = defaultdict(lambda: [0.0, 0, 0])
                for d, prob, agreed in labels:
                    per[d][0] += prob
                    per[d][1] += agreed
                    per[d][2] += 1
                    cal.append((r.domain, d, prob, agreed))
                for d, (psum, hits, trials) in per.items():
                    upd.append((r.rid, self.drafters[d].name, psum / trials, hits, trials))
            else:
                for name, (toks, probs) in (r.proposals or {}).items():
                    if not toks:
                        continue
                    match = 0
                    while match < len(toks) and match < len(tokens) and toks[match] == tokens[match]:
                        match += 1
                    upd.append((r.rid, name, float(np.mean(probs)), match, len(toks)))
            if r.drafters and r.params.mode is Mode.COSINE:
                rnd.append((r.rid, n_acc))
            if log.isEnabledFor(logging.DEBUG):
                log.debug("round rid=%s mode=%s nodes=%d accepted=%d draft_s=%.3f verify_s=%.3f drafters=%s "
                          "agreed=%s", r.rid, r.params.mode, r.tree.n, n_acc, r.draft_s, res.busy_s, r.drafters,
                          {u[1]: f"{u[3]}/{u[4]}@{u[2]:.2f}" for u in upd if u[0] == r.rid})
            verify_share = res.busy_s * r.tree.n / max(n_total, 1)
            if r.params.mode is Mode.COSINE and self.engagement is not None:
                for arm in [n for n in r.drafters if n in self.model_drafters] or [FREE]:
                    self.engagement.observe(r.domain, arm, n_acc + 1.0, r.draft_s + verify_share)
            if r.params.mode is Mode.COSINE and drafted:
                # depth: the positions verified (early stop and pruning may end short of the plan)
                self.spec.observe(r.rid, drafted, n_acc, r.draft_s, verify_share,
                                  depth=int(r.tree.depths().max()), overlapped_s=r.draft_overlap_s,
                                  steps=max((len(t) for t, _ in (r.proposals or {}).values()), default=0))
            elif r.tree.n == 1:
                self.spec.observe_plain(res.busy_s)
            for name in r.drafters:
                r.drafters_used.add(name)
            text, ids = r.accept(tokens)
            self.stats_.tokens += len(ids)
            r.commit_nodes = [int(n) for n in vr.nodes]
            r.tree, r.phase, r.wait_since = None, "draft", time.monotonic()
            if r.params.stream and (text or ids):
                ident, crid, seq = r.client
                self.emit(ident, {"v": VERSION, "op": "chunk", "seq": seq, "rid": crid, "ok": True,
                                  "text": text, "tokens": ids})
            if r.done:
                finished.append(r)
        if upd or rnd:
            self.router.update(upd, rnd)
        if cal:
            self.fuser.observe(cal)
        for r in finished:  # after the router update, which must reach it before finish()
            self._finish(r)
        return res.busy_s
