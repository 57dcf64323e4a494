"""The admission phase: place each new request on a verifier with KV room for its worst
case, prefill the target with its prompt (all but the last token, the root of its first
tree), and let the router classify it meanwhile (docs/design.md, "A round").

Backpressure: a request is prefilled only once a verifier has room, so admitted requests
never run out of cache mid-way; the rest wait in FIFO order (bounded by
max_pending_requests, timed out by request_timeout_s).

A verifier that stops answering is marked dead and probed every second; requests it
held are parked (ControlCore.park): they wait at the head of the queue and are prefilled
again, from their committed tokens, on the first verifier with room that answers (the
same one once it is back, or another). A parked request is never placed on a dead one.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

import pykka

from cosine.config import Config
from cosine.keyslots import KeyLayout

from .ports import Waits
from .proxies import Timed
from .request import Failure, Request
from .stats import ControllerStats
from .wire import client_code

log = logging.getLogger("cosine.control.admission")
PROBE_EVERY_S = 1.0  # a dead verifier is asked for its health this often (a restart takes seconds)


@dataclass
class VerifierSlot:
    name: str
    port: Any                        # VerifierPort (control/actors.py) or Inline(VerifierProxy)
    load: int = 0                    # requests placed on it
    busy_s: float = 0.0
    reserved: int = 0                # KV tokens reserved by its admitted requests (worst case)
    alive: bool = True
    probe: Any = None                # the health probe in flight while it is marked dead
    next_probe: float = 0.0
    layout: KeyLayout | None = None  # its engine's key layout (cosine/keyslots.py); None: appended keys


@dataclass
class Admitted:
    running: list[Request] = field(default_factory=list)   # prefilled: they run from the next round
    resumed: list[Request] = field(default_factory=list)   # of those, requests prefilled again after a loss
    failed: list[Failure] = field(default_factory=list)


class Admission:
    def __init__(self, cfg: Config, verifiers: list[VerifierSlot], router: Any, waits: Waits,
                 stats: ControllerStats):
        self.verifiers = verifiers
        self.budgets = [max(1, cfg.worker(v.name).kv_budget_tokens) for v in verifiers]
        self.max_tree_nodes = cfg.limits.max_tree_nodes
        self.max_prefill_tokens = cfg.controller.scheduling.max_prefill_tokens
        self.router = router          # RouterPort
        self.waits, self.stats = waits, stats
        self.probe_timeout_s = min(1.0, cfg.controller.worker_timeout_s)

    def kv_need(self, r: Request, i: int) -> int:
        """Worst-case KV tokens of a request on verifier i: prompt + all its output (up to the
        context) + the largest pending tree; capped at the budget so a huge request still
        runs, alone."""
        final = min(len(r.prompt) + r.params.max_tokens, r.context_limit)
        return min(self.budgets[i], final + self.max_tree_nodes)

    def place(self, r: Request) -> int | None:
        """The verifier with the most free KV budget that has room for ``r``'s worst case
        (an idle verifier always has room), or None: then it waits in the queue."""
        best, free_best = None, -1
        for i, v in enumerate(self.verifiers):
            if not v.alive:
                continue
            free = self.budgets[i] - v.reserved
            if (self.kv_need(r, i) <= free or v.load == 0) and free > free_best:
                best, free_best = i, free
        return best

    def admit(self, incoming: deque[Request]) -> Admitted:
        """Prefill the requests at the head of ``incoming`` that have a place (one prefill op
        per verifier); a request the worker turned away for room waits again at the head."""
        out = Admitted()
        by_v = self._take(incoming)
        if not by_v:
            return out
        # The target holds every committed token but the last (the root of the next tree):
        # the prompt's, or after a verifier loss the output's too.
        futs = {i: self.verifiers[i].port.prefill([_prefill_item(r) for r in rs]) for i, rs in by_v.items()}
        # Asked now, collected after the prefill: the router classifies while the target prefills.
        domains = {r.rid: self.router.start(r.rid, r.prompt_text) for rs in by_v.values() for r in rs
                   if r.parked_since is None}
        for i, rs in by_v.items():
            v = self.verifiers[i]
            res: Timed = self.waits.get(futs[i], "verifiers")
            if res.error == "soft" and len(rs) > 1:  # isolate the bad request: one by one
                results = [(r, self.waits.get(v.port.prefill([_prefill_item(r)]), "verifiers")) for r in rs]
            else:
                results = [(r, res) for r in rs]
            for r, res1 in results:
                if res1.error is None:
                    self._running(r, v, domains, out)
                    continue
                v.load -= 1
                v.reserved -= r.kv_reserved
                if res1.error == "dead":  # the verifier is gone: wait for it (or another) at the head
                    self.mark_dead(v, res1.message)
                    r.parked_since, r.parked_on = r.parked_since or time.monotonic(), v.name
                    r.verifier, r.kv_reserved = 0, 0
                    incoming.appendleft(r)
                    continue
                if r.parked_since is None:
                    self.router.finish_many.defer([r.rid])  # classified for nothing
                if res1.extra.get("code") == "capacity" and v.load > 0:
                    # the worker has less room than reserved for (e.g. it is shared): wait
                    r.verifier, r.kv_reserved = 0, 0
                    incoming.appendleft(r)
                    continue
                out.failed.append(Failure(r, client_code(res1.error, res1.extra.get("code")),
                                          f"prefill on verifier {v.name} failed: {res1.message}"))
        return out

    def _running(self, r: Request, v: VerifierSlot, domains: dict[str, Any], out: Admitted) -> None:
        if r.parked_since is None:
            r.domain = self.waits.get(domains[r.rid], "router")
        else:
            log.warning("request %s resumed on verifier %s after %.1f s parked (lost with %s): prefilled again "
                        "from its %d committed tokens", r.rid, v.name, time.monotonic() - r.parked_since,
                        r.parked_on, len(r.committed) - 1)
            r.parked_since, r.resumes = None, r.resumes + 1
            self.stats.resumed_requests += 1
            out.resumed.append(r)
        out.running.append(r)

    def park(self, r: Request) -> None:
        """``r``'s verifier lost it: free its place there (without a release: the worker is
        gone, restarted, or frees it when its probe answers) so admission places it again."""
        v = self.verifiers[r.verifier]
        v.load -= 1
        v.reserved -= r.kv_reserved
        r.verifier, r.kv_reserved = 0, 0

    def mark_dead(self, v: VerifierSlot, why: str) -> None:
        if v.alive:
            log.error("verifier %s marked dead (%s); its requests are parked until it, or another verifier with "
                      "room, answers (verifier_grace_s); probing it every %.0f s", v.name, why, PROBE_EVERY_S)
        v.alive = False
        v.next_probe = time.monotonic() + PROBE_EVERY_S

    def check_health(self, parked: dict[str, list[str]]) -> None:
        """Probe the dead verifiers (never waiting on a probe); one that answers is alive
        again, with the caches of the requests parked off it (``parked``: name -> rids) freed."""
        now = time.monotonic()
        for v in self.verifiers:
            if v.alive:
                continue
            if v.probe is not None:
                try:
                    ok = v.probe.get(timeout=0)
                except pykka.Timeout:
                    continue
                v.probe = None
                if ok:
                    v.alive = True
                    log.warning("verifier %s answers again; parked requests are prefilled on it", v.name)
                    continue
                v.next_probe = now + PROBE_EVERY_S
            elif now >= v.next_probe:
                v.probe = v.port.probe(self.probe_timeout_s, parked.get(v.name, []))

    def _take(self, incoming: deque[Request]) -> dict[int, list[Request]]:
        """Place the head of the queue, in order, while there is room. One prefill op per
        tick holds at most max_prefill_tokens prompt tokens (at least one request): a burst
        of long prompts must not become one forward that outlasts worker_timeout_s (16 x 128
        tokens took over 30 s for the 1.5B on 2 CPU cores)."""
        by_v: dict[int, list[Request]] = defaultdict(list)
        budget = self.max_prefill_tokens
        while incoming and (budget > 0 or not by_v):
            i = self.place(incoming[0])
            if i is None:  # head of line waits: later (smaller) requests must not starve it
                r = incoming[0]
                if not r.queued:
                    r.queued = True
                    self.stats.queue_waits += 1
                break
            r = incoming.popleft()
            r.verifier = i
            r.kv_reserved = self.kv_need(r, i)
            self.verifiers[i].load += 1
            self.verifiers[i].reserved += r.kv_reserved
            by_v[i].append(r)
            budget -= len(r.committed)
        return by_v

    def release(self, r: Request) -> None:
        """A running request ended: free its place and its cache on the verifier (a tell)."""
        v = self.verifiers[r.verifier]
        v.load -= 1
        v.reserved -= r.kv_reserved
        v.port.release.defer([r.rid])


def _prefill_item(r: Request) -> tuple[str, list[int], int]:
    """What the target prefills for ``r``: every committed token but the last (the root of
    its next tree), of which the prompt's but its last one are prompt tokens; the last
    prompt token and any output were computed by verify forwards in the first run."""
    tokens = r.committed[:-1]
    return r.rid, tokens, min(len(tokens), len(r.prompt) - 1)
