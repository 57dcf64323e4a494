"""`cosine-serve --config config.toml`: the control plane's process.

Connects to every worker, starts the actors (control/actors.py) around the controller's
core, profiles the cost model, and serves clients through the frontend (frontend.py)
until SIGTERM / SIGINT.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import numpy as np
import pykka
import zmq
from tokenizers import Tokenizer

from cosine import config as cfgmod
from cosine.config import Config
from cosine.log import setup
from cosine.security import CurveKeys, stop_authenticators
from cosine.workers.client import WorkerClient, WorkerError

from .actors import ControllerPort, start_controller, start_drafters, start_fuser, start_router, start_verifiers
from .admission import VerifierSlot
from .costs import CostModel
from .drafting.drafters import DrafterSlot
from .frontend import Frontend, Target, event_sender
from .proxies import DraftJob

log = logging.getLogger("cosine.control.serve")

INPROC = "inproc://cosine-serve-events"


def wait_healthy(cfg: Config, names: list[str], timeout_s: float,
                 optional: frozenset[str] = frozenset(), optional_timeout_s: float | None = None
                 ) -> dict[str, dict[str, Any]]:
    """Health of every named worker, in parallel; raises naming the ones that never
    answered, except ``optional`` ones (waited for ``optional_timeout_s``, default
    ``timeout_s``), which are left out of the result."""
    out: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}

    def one(name: str) -> None:
        w = cfg.worker(name)
        wait = min(timeout_s, optional_timeout_s) if name in optional and optional_timeout_s is not None else timeout_s
        deadline = time.monotonic() + wait
        with WorkerClient(w.endpoint, timeout_s=1.0, curve=CurveKeys.from_config(cfg.security)) as c:
            while True:
                try:
                    out[name] = c.call("health", {})[0]
                    return
                except (TimeoutError, WorkerError) as e:
                    if time.monotonic() > deadline:
                        errors[name] = f"{w.endpoint}: {e}"
                        return

    threads = [threading.Thread(target=one, args=(n,), daemon=True) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for name in sorted(set(errors) & optional):
        log.warning("worker %s did not answer health in time (%s); starting without it", name, errors.pop(name))
    if errors:
        raise RuntimeError("workers did not answer health within %.0f s: %s (start them with `cosine-worker "
                           "--config ... --name NAME` or use `cosine up`)" % (
                               timeout_s, "; ".join(f"{n} at {e}" for n, e in sorted(errors.items()))))
    return out


def release_orphans(cfg: Config, names: list[str], session: str, timeout_s: float) -> None:
    """At start-up: each worker frees every request not of this session (`release` with
    ``all``), so requests of a serve that died without releasing do not hold KV memory
    until the workers' idle_timeout_s."""
    for name in names:
        try:
            with WorkerClient(cfg.worker(name).endpoint, timeout_s=timeout_s,
                              curve=CurveKeys.from_config(cfg.security)) as c:
                h, _ = c.call("release", {"all": True, "keep_prefix": session + "."})
            if h.get("released"):
                log.warning("worker %s held %d request(s) of an earlier serve session; released them",
                            name, len(h["released"]))
        except (TimeoutError, WorkerError) as e:
            log.warning("could not release earlier sessions' requests on worker %s: %s", name, e)


def read_manifest(engine_dir: Path) -> dict[str, Any]:
    return json.loads((engine_dir / "manifest.json").read_text())


def load_target(cfg: Config) -> Target:
    target = cfg.target_model()
    manifest = read_manifest(cfg.engine_dir(target))
    slots = any(i.get("name") == "key_slots" for i in manifest.get("inputs", []))
    if manifest.get("activations") == "int8" and not slots:
        log.warning("the target engine %s computes with int8 activations (quantize %s) and was exported before "
                    "key slots: a tree verify does not reproduce decoding's logits bit for bit, so speculative "
                    "modes are NOT exact with its autoregressive decoding (docs/export.md, \"Exactness\"). "
                    "Export it again with cosine-export.", cfg.engine_dir(target),
                    (manifest.get("quantization") or {}).get("mode"))
    return Target(name=target.name, tokenizer=Tokenizer.from_file(str(cfg.engine_dir(target) / "tokenizer.json")),
                  vocab=int(manifest["vocab_size"]), max_positions=int(manifest.get("max_positions") or 1 << 30),
                  eos=frozenset(int(t) for t in (manifest.get("eos_token_ids") or [])))


def profile(verifiers: list[VerifierSlot], drafters: list[DrafterSlot], target: Target) -> CostModel:
    """A few timed verify/draft calls on a dummy request, then release; fits the cost model."""
    rid = "__profile__" + uuid.uuid4().hex[:8]
    rng = np.random.default_rng(0)
    prompt = [int(x) for x in rng.integers(0, target.vocab, size=min(32, target.max_positions // 4))]
    vsamples, dsamples = [], []
    v = verifiers[0].port
    try:
        if v.prefill([(rid, prompt[:-1], len(prompt) - 1)]).get().error:
            return CostModel.default()
        for n in (1, 2, 4, 8, 1, 4):
            parents = np.arange(-1, n - 1, dtype=np.int32)
            toks = np.asarray(rng.integers(0, target.vocab, size=n), np.int32)
            toks[0] = prompt[-1]
            res = v.verify([(rid, toks, parents, None)], False).get()
            if res.error:
                break
            vsamples.append((1, n, len(prompt), res.busy_s))  # (batch, tokens, seq_len, s)
        for d in drafters:
            # the first draft call also prefills the drafter: keep it out of the samples
            if not d.alive or d.port.draft([DraftJob(rid, list(prompt), 1)]).get().error:
                continue
            for k in (1, 2, 4):
                res = d.port.draft([DraftJob(rid, list(prompt), k)]).get()
                if res.error:
                    break
                dsamples.append((1, k, len(prompt), res.busy_s))  # (batch, steps, seq_len, s)
    finally:
        v.release([rid]).get()
        for d in drafters:
            if d.alive:
                d.port.release([rid]).get()
    try:
        cost = CostModel.fit(vsamples, dsamples)
    except Exception as e:  # noqa: BLE001 - a bad fit must not stop serving
        log.warning("cost model fit failed (%s); using defaults", e)
        return CostModel.default()
    log.info("profiled cost model from %d verify and %d draft samples", len(vsamples), len(dsamples))
    return cost


class Server:
    """The whole control plane of one process: the actors plus the frontend."""

    def __init__(self, cfg: Config, connect_timeout_s: float = 60.0, profile_costs: bool = True,
                 drafter_timeout_s: float | None = None):
        self.cfg = cfg
        cc = cfg.controller
        ctx = zmq.Context.instance()
        target = load_target(cfg)
        vnames = [w.name for w in cfg.verifier_workers()]
        dnames = [w.name for w in cfg.drafter_workers()]
        # A drafter host that is down must not keep the head from serving: it starts marked
        # dead and the controller's probes admit it once it answers (docs/deploy.md).
        health = wait_healthy(cfg, vnames + dnames, connect_timeout_s, optional=frozenset(dnames),
                              optional_timeout_s=drafter_timeout_s)
        up = [n for n in vnames + dnames if n in health]
        log.info("workers healthy: %s", ", ".join(f"{n} ({health[n].get('model')})" for n in up))
        # Every start is a new session: worker rids are "<session>.<n>", and whatever an
        # earlier serve left on the workers (it was killed before releasing) is freed now.
        session = uuid.uuid4().hex[:12]
        release_orphans(cfg, up, session, cc.worker_timeout_s)

        events = ctx.socket(zmq.PULL)
        events.bind(INPROC + "-" + uuid.uuid4().hex)
        verifiers, drafters = start_verifiers(cfg, health), start_drafters(cfg, health)
        router, fuser = start_router(cfg, drafters), start_fuser(cfg)
        self.controller: ControllerPort = start_controller(
            cfg, verifiers, drafters, router, fuser, event_sender(ctx, events.getsockopt_string(zmq.LAST_ENDPOINT)))
        if profile_costs:
            self.controller.set_cost_model(profile(verifiers, drafters, target)).get()
        # The controller thread detokenizes with its own tokenizer copy; the frontend keeps target's.
        tok = Tokenizer.from_file(str(cfg.engine_dir(cfg.target_model()) / "tokenizer.json"))
        self.frontend = Frontend(cfg, self.controller, target, lambda ids: tok.decode(ids, skip_special_tokens=False),
                                 {d.name for d in drafters}, session, events, ctx)
        self.endpoint = cc.endpoint
        self.stopping = self.frontend.stopping
        log.info("cosine-serve listening on %s (mode %s, target %s, %d verifier(s), %d drafter(s))",
                 cc.endpoint, cc.mode, target.name, len(verifiers), len(drafters))

    def serve_forever(self) -> None:
        self.frontend.serve_forever()

    def close(self) -> None:
        self.stopping.set()
        try:  # tell clients of running requests, rather than leaving them to time out
            if self.controller.shutdown().get(timeout=self.cfg.controller.worker_timeout_s + 5):
                self.frontend.drain(0.5)
        except (pykka.Timeout, pykka.ActorDeadError, zmq.ZMQError) as e:
            log.warning("could not fail the running requests cleanly: %s", e)
        pykka.ActorRegistry.stop_all(timeout=10)
        self.frontend.close()
        stop_authenticators()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-serve", description="cosine control plane: clients connect here")
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--log-level", default=None)
    ap.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for the workers")
    ap.add_argument("--drafter-timeout", type=float, default=None,
                    help="seconds to wait for each drafter (default and at most: --connect-timeout); one that "
                         "does not answer starts marked dead and is admitted once it answers (`cosine up` "
                         "passes 5, so a drafter that is restarting does not hold up a restarted serve)")
    ap.add_argument("--no-profile", action="store_true", help="skip start-up cost-model profiling")
    a = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(a.config, "cosine-serve")
    if cfg is None:
        return 2
    setup(a.log_level or cfg.logging.level, cfg.logging.file, "serve")
    try:
        server = Server(cfg, connect_timeout_s=a.connect_timeout, profile_costs=not a.no_profile,
                        drafter_timeout_s=a.drafter_timeout)
    except Exception as e:  # noqa: BLE001 - any start-up failure: say why and stop the actor threads
        log.error("cannot start: %s", e, exc_info=not isinstance(e, (RuntimeError, zmq.ZMQError, OSError)))
        pykka.ActorRegistry.stop_all(timeout=5)
        return 1

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        server.stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print(f"READY cosine-serve {server.endpoint}", flush=True)
    try:
        server.serve_forever()
    finally:
        server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
