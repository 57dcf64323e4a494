"""ControlCore: the control plane's state and its round, with no threads of its own.

``step`` is one round, phase by phase (docs/design.md, "A round"): admit -> plan ->
schedule -> draft -> verify -> commit/stream. Each phase is a module of its own; they
hand each other typed values (``DraftPlan``, ``RoundBatch``, ``Draft``, ``Verified``).
The core talks to the router, the fuser and the workers through ports (control/ports.py):
Pykka actors in `cosine-serve` (control/actors.py, where ``ControllerActor`` is the
core's mailbox), or the same objects in-process (tests/test_control_core.py).
Events for the clients (chunk, done, failed) leave through ``emit`` (control/wire.py).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from typing import Any, Callable

from cosine.config import Config

from .admission import Admission, VerifierSlot
from .commit import Commit
from .costs import CostBook
from .drafting import Drafting
from .drafting.drafters import DrafterSlot, Drafters
from .drafting.engagement import Engagement
from .drafting.trees import Draft
from .metrics import ServeMetrics
from .planning import BatchGate, Planner, RoundBatch, Scheduler
from .ports import Waits
from .request import Mode, Request
from .speculation import DraftPlan, SpeculationController
from .stats import ControllerStats, RoundClock
from .verification import Verification, Verified
from .wire import CancelReply, Done, Event, Failed

log = logging.getLogger("cosine.control.core")


class ControlCore:
    def __init__(self, cfg: Config, verifiers: list[VerifierSlot], drafters: list[DrafterSlot], router: Any,
                 fuser: Any, emit: Callable[[Event], None], costs: CostBook | None = None):
        cc = self.cc = cfg.controller
        self.verifiers, self.router, self.fuser, self.emit = verifiers, router, fuser, emit
        self.requests: dict[str, Request] = {}         # admitted (prefilled) requests
        self.incoming: deque[Request] = deque()        # waiting for admission
        self.by_client: dict[tuple[Any, str], str] = {}
        self.waiting: dict[str, Draft] = {}             # drafted trees not verified yet (pipelining)
        self.stats_ = ControllerStats(metrics=ServeMetrics([d.name for d in drafters]))
        self.metrics = self.stats_.metrics
        self.waits = Waits()
        self.t0 = time.perf_counter()                   # timeline origin
        self.costs = costs or CostBook()
        self.spec = SpeculationController.from_config(cc.speculation, cc.scheduling.max_verify_tokens,
                                                      costs=self.costs)
        self.gate = BatchGate(cc.speculation, self.spec, self.costs, self.stats_)
        self.engagement = Engagement() if cc.routing.engage_by_cost else None
        self.pipelined = cfg.pipelined()
        self.drafters = Drafters(drafters, cfg.model_drafters(), cc, cfg.background_prefills(), self.spec,
                                 self.costs, self.stats_, self.waits, self.engagement,
                                 engage_waits=lambda: self.gate.batch_plain and len(self.requests) > 1)
        self.admission = Admission(cfg, verifiers, router, self.waits, self.stats_)
        self.planner = Planner(cfg, self.spec, self.gate, self.drafters)
        self.scheduler = Scheduler(cfg, self.costs, self.pipelined, len(drafters), [v.name for v in verifiers])
        self.drafting = Drafting(cc, self.drafters, self.spec, router, fuser, self.stats_, self.waits)
        self.verification = Verification(verifiers, self.costs, self.waits, self.stats_)
        self.committer = Commit(self.spec, self.engagement, self.drafters, router, fuser, self.stats_, emit)
        log.info("cosine mode %s: %s", "pipelines drafting and verification" if self.pipelined else
                 "drafts then verifies in turn", f"[controller] pipeline = {cc.pipeline!r}"
                 + ("" if cc.pipeline != "auto" else
                    (" (drafters and verifiers on separate hardware)" if self.pipelined else
                     " (a drafter shares a host and device with a verifier)"))
                 + "; model drafters prefill new prompts "
                 + ("in the background" if self.drafters.background else "inline"))

    # -- the round -----------------------------------------------------------------------
    def step(self) -> None:
        """One round: the table of contents of the control plane."""
        clock = RoundClock(tokens_before=self.stats_.tokens)
        self.drafters.check_health(self.requests)   # dead drafters that answer again are back
        self.admission.check_health(self._parked())  # ... and dead verifiers
        self._expire()                              # request_timeout_s, verifier_grace_s
        if self._admit():                           # admission.py: KV room, then prefill
            # Requests that arrived during the prefill wait in the mailbox: end the round so
            # the next admits them before any round is planned (else the first of a burst,
            # seemingly alone, engaged the model drafter, whose prefill delayed the rest).
            self.stats_.wall_s += clock.elapsed()
            return
        self.drafters.warm(self.requests)           # background prefill of model drafters
        if not self.requests:
            if self.incoming:  # nothing placeable (every verifier dead or full): no hot loop
                time.sleep(0.05)
            return
        reqs = list(self.requests.values())
        plans = self.planner.plan([r for r in reqs if r.rid not in self.waiting], len(reqs))  # planning.py
        batch = self.scheduler.schedule(reqs, self.waiting, plans)                            # planning.py
        clock.first_at, clock.first_s = self._draft(batch.draft_first, plans)                 # drafting/
        clock.verify_at = time.perf_counter()
        calls = self.verification.issue([(r, self.waiting.pop(r.rid)) for r in batch.verify])  # verification.py
        clock.along_at, clock.along_s = self._draft(batch.alongside, plans)  # pipelining: drafts overlap the verify
        verified = self.verification.collect(calls)
        self._commit(verified, batch, clock)                                                  # commit.py
        self._end_round(clock, reqs, batch)

    def _draft(self, reqs: list[Request], plans: dict[str, DraftPlan]) -> tuple[float, float]:
        """Draft ``reqs``; their trees wait in ``waiting``. Returns (start, wall seconds)."""
        t = time.perf_counter()
        if not reqs:
            return t, 0.0
        now = time.monotonic()
        for r in reqs:
            r.wait_since = now  # ready to verify from now on (scheduling's wait)
        drafts, prefill_s = self.drafting.draft(reqs, plans, len(self.requests))
        wall = time.perf_counter() - t
        for d in drafts.values():
            d.draft_s = max(0.0, wall - prefill_s)  # the drafters' prompt prefill is paid once
        self.waiting.update(drafts)
        return t, wall

    def _commit(self, verified: Verified, batch: RoundBatch, clock: RoundClock) -> None:
        """Commit and stream the verified rounds (commit.py); end the requests that failed
        or finished."""
        clock.verify_s = verified.busy_s
        for r in batch.alongside:  # the part of their drafting hidden behind the verify
            self.waiting[r.rid].overlap_s = min(self.waiting[r.rid].draft_s, verified.busy_s)
        for f in verified.failed:
            self._fail(f.request, f.code, f.message)
        for r, why in verified.lost:
            self.park(r, why)
        for i, why in verified.dead.items():  # every request on a dead verifier waits for one that answers
            self.admission.mark_dead(self.verifiers[i], why)
            for r in [r for r in self.requests.values() if r.verifier == i]:
                self.park(r, f"{self.verifiers[i].name}: marked dead")
        for r in self.committer.commit(verified.outcomes):
            self._finish(r)

    def _end_round(self, clock: RoundClock, reqs: list[Request], batch: RoundBatch) -> None:
        """The round's totals; the batch gate and the pipeline bias learn from it."""
        wall = self.stats_.record(clock, self.t0, len(batch.verify), len(batch.draft_first) + len(batch.alongside),
                                  batch.held_back, self.waits.end_round())
        if any(r.params.mode is Mode.COSINE for r in reqs):
            self.gate.goodput.observe(self.stats_.tokens - clock.tokens_before, wall)
        # Pipeline feedback only from rounds that pipelined (both groups present): with one
        # group the verifier's wait is structural and drafting more would not fill it.
        if self.cc.speculation.adaptive and batch.verify and batch.alongside:
            self.spec.observe_pipeline(max(0.0, 1.0 - clock.verify_s / max(wall, 1e-9)), len(self.waiting))

    def _admit(self) -> int:
        """Admission (admission.py); returns how many requests were prefilled."""
        if not self.incoming:
            return 0
        admitted = self.admission.admit(self.incoming)
        for f in admitted.failed:
            self._fail(f.request, f.code, f.message)
        for r in admitted.running:
            self.requests[r.rid] = r
            if r not in admitted.resumed:
                self.metrics.on_admit(r.rid, r.params.mode.value, len(r.prompt), r.arrived)
        return len(admitted.running)

    def park(self, r: Request, why: str) -> None:
        """``r``'s verifier lost it: wait at the head of the queue until a verifier with room
        answers, then be prefilled again from the committed tokens and continue (admission)."""
        if r.rid not in self.requests:
            return
        log.warning("request %s parked after %d tokens: its verifier lost it (%s)", r.rid, len(r.output), why)
        del self.requests[r.rid]
        self.waiting.pop(r.rid, None)
        self.admission.park(r)
        r.commit_nodes = None  # the tree it would commit inline is gone with the verifier
        r.parked_since, r.parked_on = time.monotonic(), why.split(":", 1)[0]
        self.incoming.appendleft(r)

    def _parked(self) -> dict[str, list[str]]:
        """Verifier name -> rids parked off it (freed there when its probe answers)."""
        out: dict[str, list[str]] = {}
        for r in self.incoming:
            if r.parked_since is not None:
                out.setdefault(r.parked_on, []).append(r.rid)
        return out

    def _expire(self) -> None:
        limit, grace = self.cc.request_timeout_s, self.cc.verifier_grace_s
        now = time.monotonic()
        for r in list(self.incoming):
            if r.parked_since is not None and now - r.parked_since > grace:
                self._fail(r, "unavailable", f"verifier {r.parked_on} lost the request after {len(r.output)} tokens "
                                             f"and no verifier took it within verifier_grace_s = {grace} s")
        for r in list(self.requests.values()) + list(self.incoming):
            if now - r.arrived > limit:
                where = "running" if r.rid in self.requests else "waiting in the queue for KV room"
                self._fail(r, "timeout", f"request exceeded request_timeout_s = {limit} s ({where} after "
                                         f"{len(r.output)} tokens); its caches were released")

    # -- the mailbox's messages ----------------------------------------------------------
    @property
    def busy(self) -> bool:
        return bool(self.requests or self.incoming)

    def submit(self, req: Request, client_key: tuple[Any, str]) -> bool:
        """Queue a request for admission; False (and the client told why) when refused."""
        if client_key in self.by_client:
            self._refuse(req.client, "duplicate_request", f"request {client_key[1]!r} is already running")
            return False
        if len(self.requests) + len(self.incoming) >= self.cc.max_pending_requests:
            self._refuse(req.client, "overloaded", f"{self.cc.max_pending_requests} requests pending "
                                                   "(max_pending_requests); retry later")
            return False
        self.by_client[client_key] = req.rid
        req.client_key = client_key
        self.incoming.append(req)
        return True

    def cancel(self, client_key: tuple[Any, str], reply_to: tuple[Any, int]) -> None:
        rid = self.by_client.get(client_key)
        if rid is None:
            self.emit(CancelReply(reply_to, client_key[1], f"no running request with rid {client_key[1]!r}"))
            return
        req = self.requests.get(rid) or next((r for r in self.incoming if r.rid == rid), None)
        if req is not None:
            self._fail(req, "cancelled", "cancelled by the client")
        self.emit(CancelReply(reply_to, client_key[1]))

    def shutdown(self) -> int:
        """Fail every request still running (the server is stopping); returns how many."""
        return self.fail_all("unavailable", "the server is shutting down")

    def fail_all(self, code: str, message: str) -> int:
        pending = list(self.requests.values()) + list(self.incoming)
        for r in pending:
            self._fail(r, code, message)
        return len(pending)

    # -- a request ends ------------------------------------------------------------------
    def _fail(self, req: Request, code: str, message: str) -> None:
        if req.done and req.rid not in self.requests:
            return
        req.finish_reason = req.finish_reason or "error"
        self.stats_.requests_failed += 1
        self._refuse(req.client, code, message)
        self._drop(req)

    def _refuse(self, client: Any, code: str, message: str) -> None:
        self.metrics.on_error(code)
        self.emit(Failed(client, code, message))

    def _finish(self, req: Request) -> None:
        self.stats_.requests_done += 1
        stats = {**req.stats(), **self.metrics.on_finish(req.rid, req.finish_reason)}  # speculation figures
        self.emit(Done(req.client, req.text, list(req.output), req.finish_reason, stats))
        self._drop(req)

    def _drop(self, req: Request) -> None:
        """Forget a request everywhere and free its caches on every worker that holds it."""
        self.by_client.pop(req.client_key, None)
        self.metrics.forget(req.rid)
        if req in self.incoming:
            self.incoming.remove(req)
        self.waiting.pop(req.rid, None)
        running = self.requests.pop(req.rid, None) is not None
        if running:
            self.admission.release(req)
        if running or req.parked_since is not None:  # a parked request still has drafter and router state
            self.drafters.release(req.rid)
            self.router.finish_many.defer([req.rid])
            self.spec.forget(req.rid)
            self.gate.forget(req.rid)

    # -- stats ---------------------------------------------------------------------------
    def stats(self, timeline: int = 0) -> dict[str, Any]:
        s = self.stats_
        wall = max(s.wall_s, 1e-9)
        drafters = {d.name: {"alive": d.alive, "busy_s": d.busy_s,
                             "idle_frac": max(0.0, 1.0 - d.busy_s / wall) if s.wall_s else None}
                    for d in self.drafters.slots}
        calibration = self.fuser.calibration_table().get()  # between rounds: not the round's wait
        return {
            "uptime_s": time.monotonic() - s.started, "mode": self.cc.mode, "pipelined": self.pipelined,
            "active_requests": len(self.requests), "queued_requests": len(self.incoming),
            "rounds": s.rounds, "tokens": s.tokens, "requests_done": s.requests_done, "gated_rounds": s.gated_rounds,
            "pruned_nodes": s.pruned_nodes, "inexact_pruned": s.inexact_pruned,
            "background_prefills": s.background_prefills,
            "guided_steps": s.guided_steps, "rescued_rounds": s.rescued_rounds, "stopped_chains": s.stopped_chains,
            "refused_drafts": s.refused_drafts, "requests_failed": s.requests_failed,
            "resumed_requests": s.resumed_requests, "parked_requests": sum(map(len, self._parked().values())),
            "mean_accepted_length": 1.0 + s.accepted_drafts / s.rounds if s.rounds else 1.0,
            "busy_wall_s": s.wall_s, "draft_wall_s": s.draft_wall_s, "verify_busy_s": s.verify_busy_s,
            "pipeline_overlap_s": s.overlap_s, "last_round": s.last_round,
            "verifier_idle_frac": max(0.0, 1.0 - s.verify_busy_s / wall) if s.wall_s else None,
            "drafter_idle_frac": (sum(v["idle_frac"] for v in drafters.values()) / len(drafters)
                                  if drafters and s.wall_s else None),
            "drafters": drafters,
            "verifiers": {v.name: {"alive": v.alive, "load": v.load, "busy_s": v.busy_s, "kv_reserved": v.reserved,
                                   "kv_budget": b}
                          for v, b in zip(self.verifiers, self.admission.budgets)},
            "queue_waits": s.queue_waits, "gate_goodput": self.gate.goodput.snapshot(),
            # domain -> "free" or model drafter -> goodput of its rounds (engagement's evidence)
            "engagement": self.engagement.snapshot() if self.engagement is not None else {},
            # domain -> drafter -> per probability bin [agreement rate, trials] (fusion's confidence)
            "calibration": {dom: {self.drafters.slots[d].name: [list(b) for b in bins] for d, bins in per.items()}
                            for dom, per in calibration.items()},
            # time the round spent blocked on each kind of actor (ticks: rounds of the controller)
            "ticks": s.ticks, "actor_wait": self.waits.snapshot(s.ticks),
            "metrics": self.metrics.snapshot(),  # what cosine-http exposes at /metrics (docs/http.md)
            **({"timeline": [list(r) for r in list(s.timeline)[-timeline:]]} if timeline > 0 else {}),
        }

    def worker_stats(self, timeout_s: float) -> dict[str, Any]:
        """Every worker's own stats, asked in parallel; a dead worker is reported, not raised."""
        out: dict[str, Any] = {}
        futs = {v.name: v.port.stats() for v in self.verifiers}
        futs.update({d.name: d.port.stats() for d in self.drafters.slots if d.alive})
        for name, f in futs.items():
            try:
                out[name] = f.get(timeout=timeout_s)
            except Exception as e:  # noqa: BLE001 - a dead worker is reported, not raised
                out[name] = {"error": str(e)}
        for d in self.drafters.slots:
            if not d.alive:
                out[d.name] = {"error": "marked dead; probing"}
        return out

