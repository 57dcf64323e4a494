"""The control plane's five actors (Pykka threads), after the design card:

    frontend (frontend.py) --submit/cancel/stats--> ControllerActor --events--> frontend
    ControllerActor --select/update/finish--> RouterActor
                    --fuse/guides/prune/observe--> FuserActor
                    --draft/warm/release/probe--> DrafterProxyActor x N  (one per drafter worker)
                    --prefill/verify/release--> VerifierProxyActor x M

Each actor owns one pure object and runs its methods on the actor's own thread: the
Router, the Fuser (control/drafting/), a DrafterProxy or VerifierProxy (control/proxies.py),
and for the controller the ControlCore (control/core.py), which drives the others through
typed ports: an ask returns a future, collected as late as the round allows; updates
nothing waits for are tells (``.defer``). Tests drive the same objects in-process through
``ports.Inline``.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Generic, TypeVar, cast

import pykka
from pykka.typing import ActorMemberMixin, proxy_method

from cosine.config import Config
from cosine.keyslots import KeyLayout
from cosine.security import CurveKeys

from .admission import VerifierSlot
from .core import ControlCore
from .costs import CostModel
from .drafting.domains import NgramClassifier, make_classifier
from .drafting.drafters import DrafterSlot
from .drafting.fuser import Fuser
from .drafting.routing import DrafterInfo, Router
from .proxies import DrafterProxy, VerifierProxy, WorkerProxy
from .request import Request
from .wire import Event

log = logging.getLogger("cosine.control.actors")

S = TypeVar("S")


class _Host(pykka.ThreadingActor, Generic[S]):
    """An actor that owns one object; callers reach its methods as ``proxy().service.m(...)``."""

    def __init__(self, service: S):
        super().__init__()
        self.service = pykka.traversable(service)


class RouterActor(_Host[Router]):
    """The router's thread: per-request drafter scores and the domain priors."""


class FuserActor(_Host[Fuser]):
    """The fuser's thread: fusion steps, guides, pruning, and calibration."""


class _WorkerActor(_Host[WorkerProxy]):
    """A worker proxy's thread: it owns the worker's DEALER socket, made on this thread."""

    def on_start(self) -> None:
        self.service.connect()

    def on_stop(self) -> None:
        self.service.close()


class VerifierProxyActor(_WorkerActor):
    """A verifier worker: prefill, tree verify (with inline commit), release."""


class DrafterProxyActor(_WorkerActor):
    """A drafter worker, and the mirror of what its cache holds per request."""


# -- starting them, with typed ports (pykka.typing): the asks the core may make of each
# actor. A tell is ``port.method.defer(...)`` on the same proxy: the router's update_many
# and finish_many, the fuser's observe, a worker's release.
class RouterPort:
    start = proxy_method(Router.start)
    select_many = proxy_method(Router.select_many)
    scores_many = proxy_method(Router.scores_many)


def start_router(cfg: Config, drafters: list[DrafterSlot]) -> RouterPort:
    """The router's actor; its domain classifier learns from the n-gram drafters' corpora."""
    cc = cfg.controller
    neural = cfg.model_drafters()
    infos = [DrafterInfo(d.name, tuple(d.domains), d.name in neural) for d in drafters]
    t0, corpora = time.perf_counter(), cfg.domain_corpora()
    classifier = make_classifier(cc.routing.classifier, corpora)
    log.info("domain classifier: %s (%.1f s)", f"n-gram naive Bayes over {', '.join(sorted(corpora))} corpora"
             if isinstance(classifier, NgramClassifier) else "keywords" + (
                 " (no n-gram drafter corpus on disk)" if cc.routing.classifier == "ngram" else ""),
             time.perf_counter() - t0)
    router = Router.from_config(infos, cc.routing, classifier=classifier, seed=cc.seed)
    return cast(RouterPort, RouterActor.start(router).proxy().service)


class FuserPort:
    fuse = proxy_method(Fuser.fuse)
    guides = proxy_method(Fuser.guides)
    prune = proxy_method(Fuser.prune)
    calibration_table = proxy_method(Fuser.calibration_table)


def start_fuser(cfg: Config) -> FuserPort:
    f = cfg.controller.fusion
    return cast(FuserPort, FuserActor.start(Fuser(f.rule, f.min_confidence, f.calibrate)).proxy().service)


class VerifierPort:
    prefill = proxy_method(VerifierProxy.prefill)
    verify = proxy_method(VerifierProxy.verify)
    probe = proxy_method(VerifierProxy.probe)
    stats = proxy_method(VerifierProxy.stats)


def start_verifiers(cfg: Config, health: dict[str, dict[str, Any]]) -> list[VerifierSlot]:
    """One proxy actor per verifier; ``health``: their health replies (the engine's key
    layout, which greedy trees are pruned to)."""
    t, keys = cfg.controller.worker_timeout_s, CurveKeys.from_config(cfg.security)
    return [VerifierSlot(w.name, cast(VerifierPort, VerifierProxyActor.start(
        VerifierProxy(w.name, w.endpoint, t, curve=keys)).proxy().service),
        layout=KeyLayout.from_dict((health.get(w.name, {}).get("engine") or {}).get("key_layout")))
        for w in cfg.verifier_workers()]


class DrafterPort:
    draft = proxy_method(DrafterProxy.draft)
    warm = proxy_method(DrafterProxy.warm)
    probe = proxy_method(DrafterProxy.probe)
    stats = proxy_method(DrafterProxy.stats)


def start_drafters(cfg: Config, health: dict[str, dict[str, Any]]) -> list[DrafterSlot]:
    """A drafter that was down at start-up (no ``health``) starts marked dead: its probes
    admit it once it answers. It reports no context length then: a too-long draft is a
    soft error."""
    t, keys = cfg.controller.worker_timeout_s, CurveKeys.from_config(cfg.security)
    slots = []
    for i, w in enumerate(cfg.drafter_workers()):
        m = cfg.model(w.model)
        proxy = DrafterProxy(w.name, w.endpoint, t, curve=keys, context_window=m.draft_context)
        port = cast(DrafterPort, DrafterProxyActor.start(proxy).proxy().service)
        eng = (health.get(w.name) or {}).get("engine") or {}
        slots.append(DrafterSlot(w.name, i, port, int(eng.get("max_positions") or 1 << 30), m.domains,
                                 alive=w.name in health))
    return slots


class ControllerActor(pykka.ThreadingActor):
    """The controller's mailbox: submit, cancel, stats and shutdown from the frontend, and
    ``tick``, which it sends itself while requests are running: each runs one round
    (``ControlCore.step``). Messages that arrive during a round wait for its end."""

    def __init__(self, cfg: Config, verifiers: list[VerifierSlot], drafters: list[DrafterSlot], router: RouterPort,
                 fuser: FuserPort, emit_factory: Callable[[], Callable[[Event], None]]):
        super().__init__()
        self._emit_factory = emit_factory
        self._send: Callable[[Event], None] = lambda e: None
        self.worker_timeout = cfg.controller.worker_timeout_s
        self.core = ControlCore(cfg, verifiers, drafters, router, fuser, self._emit)
        self._tick_pending = False

    def on_start(self) -> None:
        self._send = self._emit_factory()  # its socket belongs to this thread
        self._me = self.actor_ref.proxy()

    def _emit(self, event: Event) -> None:
        self._send(event)

    def submit(self, req: Request, client_key: tuple[Any, str]) -> None:
        if self.core.submit(req, client_key):
            self._kick()

    def cancel(self, client_key: tuple[Any, str], reply_to: tuple[Any, int]) -> None:
        self.core.cancel(client_key, reply_to)

    def stats(self, timeline: int = 0) -> dict[str, Any]:
        return self.core.stats(timeline)

    def worker_stats(self) -> dict[str, Any]:
        return self.core.worker_stats(self.worker_timeout + 1)

    def shutdown(self) -> int:
        return self.core.shutdown()

    def set_cost_model(self, cost: CostModel) -> None:
        self.core.costs.profile = cost

    def tick(self) -> None:
        self._tick_pending = False
        try:
            self.core.step()
        except Exception:  # noqa: BLE001 - a bug must fail requests, not kill the server silently
            log.exception("round failed; failing its requests")
            self.core.fail_all("internal", "internal error in the controller round; see the server log")
        if self.core.busy:
            self._kick()

    def _kick(self) -> None:
        if not self._tick_pending:
            self._tick_pending = True
            self._me.tick.defer()


class ControllerPort(ActorMemberMixin, pykka.ActorProxy[ControllerActor]):
    submit = proxy_method(ControllerActor.submit)
    cancel = proxy_method(ControllerActor.cancel)
    stats = proxy_method(ControllerActor.stats)
    worker_stats = proxy_method(ControllerActor.worker_stats)
    shutdown = proxy_method(ControllerActor.shutdown)
    set_cost_model = proxy_method(ControllerActor.set_cost_model)


def start_controller(cfg: Config, verifiers: list[VerifierSlot], drafters: list[DrafterSlot], router: RouterPort,
                     fuser: FuserPort, emit_factory: Callable[[], Callable[[Event], None]]) -> ControllerPort:
    return cast(ControllerPort, ControllerActor.start(cfg, verifiers, drafters, router, fuser, emit_factory).proxy())
