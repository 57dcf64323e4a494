"""`cosine-serve --config config.toml`: the control plane's front door.

A ZeroMQ ROUTER at [controller] endpoint speaks the same codec as the workers
(cosine.protocol). Client ops:

    generate {rid?, prompt | array tokens, max_tokens, temperature, top_p, stop, mode, stream, seed}
        -> {op: "chunk", rid, text, tokens}* (stream) then {op: "done", rid, text, token_ids,
           finish_reason, stats}; or {ok: false, error}
    cancel {rid}   health   stats

The frontend thread validates and tokenizes; everything else happens in the actors
(cosine.control.actors). Replies come back from the controller thread over an inproc
PUSH/PULL pair, because only this thread may touch the ROUTER socket.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import math
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
from cosine.config import MODES, Config
from cosine.log import setup
from cosine.protocol import VERSION, ProtocolError, decode, encode, error_reply, ok_reply
from cosine.security import CurveKeys, secure_server, stop_authenticators
from cosine.workers.client import WorkerClient, WorkerError

from .actors import ControllerActor, DrafterSlot, FuserActor, RouterActor, VerifierSlot
from .costs import CostModel
from .drafting.domains import NgramClassifier, make_classifier
from .drafting.routing import DrafterInfo, Router
from .proxies import DrafterProxyActor, DraftJob, VerifierProxyActor
from .request import Detokenizer, GenParams, Mode, Request

log = logging.getLogger("cosine.control.serve")

INPROC = "inproc://cosine-serve-replies"
MIN_TEMPERATURE = 1e-4  # smallest sampling temperature (0 = greedy); below it logits / T can overflow
GENERATE_KEYS = {"v", "op", "seq", "arrays", "rid", "prompt", "max_tokens", "temperature", "top_p", "stop",
                 "mode", "stream", "seed", "ignore_eos", "drafters"}


def wait_healthy(cfg: Config, names: list[str], timeout_s: float,
                 optional: frozenset[str] = frozenset()) -> dict[str, dict[str, Any]]:
    """Health of every named worker, in parallel; raises naming the ones that never
    answered, except ``optional`` ones, which are left out of the result."""
    out: dict[str, dict[str, Any]] = {}
    errors: dict[str, str] = {}

    def one(name: str) -> None:
        w = cfg.worker(name)
        deadline = time.monotonic() + timeout_s
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
        log.warning("worker %s did not answer health within %.0f s (%s); starting without it", name, timeout_s,
                    errors.pop(name))
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


class Server:
    """The whole control plane of one process: actors plus the ROUTER frontend."""

    def __init__(self, cfg: Config, connect_timeout_s: float = 60.0, profile: bool = True):
        self.cfg = cfg
        cc = cfg.controller
        self.ctx = zmq.Context.instance()
        target = cfg.target_model()
        self.manifest = read_manifest(cfg.engine_dir(target))
        self.tokenizer = Tokenizer.from_file(str(cfg.engine_dir(target) / "tokenizer.json"))
        self.vocab = int(self.manifest["vocab_size"])
        self.max_positions = int(self.manifest.get("max_positions") or 1 << 30)
        self.eos = frozenset(int(t) for t in (self.manifest.get("eos_token_ids") or []))
        vnames = [w.name for w in cfg.verifier_workers()]
        dnames = [w.name for w in cfg.drafter_workers()]
        # A drafter host that is down must not keep the head from serving: it starts marked
        # dead and the controller's probes admit it once it answers (docs/deploy.md).
        health = wait_healthy(cfg, vnames + dnames, connect_timeout_s, optional=frozenset(dnames))
        up = [n for n in vnames + dnames if n in health]
        log.info("workers healthy: %s", ", ".join(f"{n} ({health[n].get('model')})" for n in up))
        # Every start is a new session: worker rids are "<session>.<n>", and whatever an
        # earlier serve left on the workers (it was killed before releasing) is freed now.
        self.session = uuid.uuid4().hex[:12]
        release_orphans(cfg, up, self.session, cc.worker_timeout_s)

        self.pull = self.ctx.socket(zmq.PULL)
        self.pull.bind(INPROC + "-" + uuid.uuid4().hex)
        self.pull_addr = self.pull.getsockopt_string(zmq.LAST_ENDPOINT)

        t, keys = cc.worker_timeout_s, CurveKeys.from_config(cfg.security)
        self.verifiers = [VerifierSlot(n, VerifierProxyActor.start(n, cfg.worker(n).endpoint, t, curve=keys).proxy())
                          for n in vnames]
        self.drafters = []
        for i, n in enumerate(dnames):
            w = cfg.worker(n)
            eng = (health.get(n) or {}).get("engine") or {}
            # (a drafter that was down reports no context length: a too-long draft is a soft error)
            m = cfg.model(w.model)
            proxy = DrafterProxyActor.start(n, w.endpoint, t, i, curve=keys, context_window=m.draft_context).proxy()
            self.drafters.append(DrafterSlot(n, i, proxy, int(eng.get("max_positions") or 1 << 30), m.domains,
                                             alive=n in health))
        neural = cfg.model_drafters()
        infos = [DrafterInfo(d.name, tuple(d.domains), d.name in neural) for d in self.drafters]
        t0, corpora = time.perf_counter(), cfg.domain_corpora()
        classifier = make_classifier(cc.routing.classifier, corpora)
        log.info("domain classifier: %s (%.1f s)", f"n-gram naive Bayes over {', '.join(sorted(corpora))} corpora"
                 if isinstance(classifier, NgramClassifier) else "keywords" + (
                     " (no n-gram drafter corpus on disk)" if cc.routing.classifier == "ngram" else ""),
                 time.perf_counter() - t0)
        self.router = RouterActor.start(Router.from_config(infos, cc.routing, classifier=classifier,
                                                           seed=cc.seed)).proxy()
        self.fuser = FuserActor.start(cc.fusion.rule, cc.fusion.min_confidence, cc.fusion.calibrate).proxy()
        pull_addr = self.pull_addr
        ctx = self.ctx

        def emit_factory():
            push = ctx.socket(zmq.PUSH)
            push.connect(pull_addr)

            def emit(ident: bytes, header: dict[str, Any]) -> None:
                push.send_multipart([ident, *encode(header, {})])
            return emit

        # The controller thread detokenizes with its own copy; this thread keeps self.tokenizer.
        tok = Tokenizer.from_file(str(cfg.engine_dir(target) / "tokenizer.json"))
        self.decode_out = lambda ids: tok.decode(ids, skip_special_tokens=False)
        self.controller = ControllerActor.start(
            cfg, self.verifiers, self.drafters, self.router, self.fuser, emit_factory).proxy()
        if profile:
            self.controller.set_cost_model(self.profile()).get()
        self.router_sock = self.ctx.socket(zmq.ROUTER)
        self.router_sock.setsockopt(zmq.LINGER, 0)
        secure_server(self.router_sock, cfg.security, endpoint=cc.endpoint,
                      max_message_bytes=cfg.limits.max_message_bytes, what="cosine-serve")
        self.router_sock.bind(cc.endpoint)
        self.endpoint = cc.endpoint
        self.rids = itertools.count(1)
        self.stopping = threading.Event()
        log.info("cosine-serve listening on %s (mode %s, target %s, %d verifier(s), %d drafter(s))",
                 cc.endpoint, cc.mode, target.name, len(self.verifiers), len(self.drafters))

    # -- cost model profiling ---------------------------------------------------------
    def profile(self) -> CostModel:
        """A few timed verify/draft calls on a dummy request, then release; fits the cost model."""
        rid = "__profile__" + uuid.uuid4().hex[:8]
        rng = np.random.default_rng(0)
        prompt = [int(x) for x in rng.integers(0, self.vocab, size=min(32, self.max_positions // 4))]
        vsamples, dsamples = [], []
        try:
            v = self.verifiers[0].proxy
            if v.prefill([(rid, prompt[:-1])]).get().error:
                return CostModel.default()
            for n in (1, 2, 4, 8, 1, 4):
                parents = np.arange(-1, n - 1, dtype=np.int32)
                toks = np.asarray(rng.integers(0, self.vocab, size=n), np.int32)
                toks[0] = prompt[-1]
                res = v.verify([(rid, toks, parents, None)], False).get()
                if res.error:
                    break
                vsamples.append((1, n, len(prompt), res.busy_s))  # (batch, tokens, seq_len, s)
            for d in self.drafters:
                # the first draft call also prefills the drafter: keep it out of the samples
                if not d.alive or d.proxy.draft([DraftJob(rid, list(prompt), 1)]).get().error:
                    continue
                for k in (1, 2, 4):
                    res = d.proxy.draft([DraftJob(rid, list(prompt), k)]).get()
                    if res.error:
                        break
                    dsamples.append((1, k, len(prompt), res.busy_s))  # (batch, steps, seq_len, s)
        finally:
            self.verifiers[0].proxy.release([rid]).get()
            for d in self.drafters:
                if d.alive:
                    d.proxy.release([rid]).get()
        try:
            cost = CostModel.fit(vsamples, dsamples)
        except Exception as e:  # noqa: BLE001 - a bad fit must not stop serving
            log.warning("cost model fit failed (%s); using defaults", e)
            return CostModel.default()
        log.info("profiled cost model from %d verify and %d draft samples", len(vsamples), len(dsamples))
        return cost

    # -- request parsing -------------------------------------------------------------------
    def parse_generate(self, h: dict[str, Any], arrays: dict[str, np.ndarray]) -> tuple[str, GenParams, list[int], str]:
        cc, lim = self.cfg.controller, self.cfg.limits

        def bad(msg: str) -> ProtocolError:
            return ProtocolError("bad_request", msg)

        unknown = sorted(str(k) for k in set(h) - GENERATE_KEYS)  # keys may be bytes: never compare mixed types
        if unknown:
            raise bad(f"unknown field(s) {unknown}; generate takes {sorted(GENERATE_KEYS - {'v', 'op', 'seq', 'arrays'})}")
        rid = h.get("rid", None)
        if rid is None:
            rid = uuid.uuid4().hex
        if not isinstance(rid, str) or not 0 < len(rid) <= 200:
            raise bad("rid must be a non-empty string of at most 200 characters")

        def num(key: str, default: Any, kind: type, lo: float, hi: float, lo_open: bool = False) -> Any:
            x = h.get(key, default)
            ok_type = isinstance(x, int) if kind is int else isinstance(x, (int, float))
            if isinstance(x, bool) or not ok_type:
                raise bad(f"{key} must be {'an integer' if kind is int else 'a number'}, got {type(x).__name__}")
            if kind is float and not math.isfinite(x):
                raise bad(f"{key} must be finite")
            if x < lo or (lo_open and x == lo) or x > hi:
                raise bad(f"{key} = {x} out of range {'(' if lo_open else '['}{lo}, {hi}]")
            return kind(x)

        max_tokens = h.get("max_tokens", 128)
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
            raise bad(f"max_tokens must be an integer, got {type(max_tokens).__name__}")
        if max_tokens < 1:
            raise bad(f"max_tokens must be >= 1, got {max_tokens}")
        if max_tokens > lim.max_new_tokens:
            raise bad(f"max_tokens = {max_tokens} is over the server limit {lim.max_new_tokens} (limits.max_new_tokens)")
        temperature = num("temperature", cc.temperature, float, 0.0, 100.0)
        if 0.0 < temperature < MIN_TEMPERATURE:  # logits / 1e-320 overflows: the round would fail
            raise bad(f"temperature = {temperature} is too small to sample with; use 0 for greedy or at least "
                      f"{MIN_TEMPERATURE}")
        top_p = num("top_p", 1.0, float, 0.0, 1.0, lo_open=True)
        mode = h.get("mode", None)
        mode = cc.mode if mode is None else mode
        if mode not in MODES:
            raise bad(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
        stop = h.get("stop", None) or []
        if isinstance(stop, str):
            stop = [stop]
        if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
            raise bad("stop must be a list of at most 16 non-empty strings")
        stream = h.get("stream", False)
        if not isinstance(stream, bool):
            raise bad("stream must be a boolean")
        ignore_eos = h.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise bad("ignore_eos must be a boolean")
        drafters = h.get("drafters", None) or []
        names = {d.name for d in self.drafters}
        if not isinstance(drafters, list) or not all(isinstance(n, str) for n in drafters):
            raise bad("drafters must be a list of drafter worker names")
        if set(drafters) - names:
            raise bad(f"unknown drafter(s) {sorted(set(drafters) - names)}; this server has {sorted(names)}")
        seed = h.get("seed", None)
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
            raise bad("seed must be a non-negative integer or absent")

        has_text, has_tokens = "prompt" in h, "tokens" in arrays
        if has_text == has_tokens:
            raise bad("give exactly one of 'prompt' (a string) or the array 'tokens' (int32)")
        if has_text:
            prompt = h["prompt"]
            if not isinstance(prompt, str):
                raise bad(f"prompt must be a string, got {type(prompt).__name__}")
            if len(prompt) > 64 * lim.max_prompt_tokens:
                raise ProtocolError("too_long", f"prompt of {len(prompt)} characters is over the limit")
            ids = self.tokenizer.encode(prompt).ids
            text = prompt
        else:
            a = arrays["tokens"]
            if a.ndim != 1 or a.dtype.name not in ("int32", "int64"):
                raise bad(f"tokens must be a 1-D int32 array, got {a.dtype.name}{list(a.shape)}")
            if a.size and (a.min() < 0 or a.max() >= self.vocab):
                raise bad(f"token ids must be in [0, {self.vocab})")
            ids = [int(x) for x in a]
            text = self.tokenizer.decode(ids)
        if not ids:
            raise bad("empty prompt: give at least one token")
        if len(ids) > lim.max_prompt_tokens:
            raise ProtocolError("too_long", f"prompt has {len(ids)} tokens; the limit is {lim.max_prompt_tokens} "
                                            f"(limits.max_prompt_tokens)")
        if len(ids) >= self.max_positions:
            raise ProtocolError("too_long", f"prompt has {len(ids)} tokens; the model's context is "
                                            f"{self.max_positions} positions, which leaves no room to generate")
        params = GenParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                           mode=Mode(mode), stream=stream, seed=seed, ignore_eos=ignore_eos, drafters=tuple(drafters))
        return rid, params, ids, text

    # -- serving ---------------------------------------------------------------------------
    def _send(self, ident: bytes, header: dict[str, Any]) -> None:
        self.router_sock.send_multipart([ident, *encode(header, {})])

    def handle(self, frames: list[bytes]) -> None:
        ident, body = frames[0], frames[1:]
        try:
            h, arrays = decode(body)
        except ProtocolError as e:
            self._send(ident, error_reply(None, e))
            return
        op = h.get("op")
        try:
            if h.get("v") != VERSION:
                raise ProtocolError("version", f"protocol version {h.get('v')!r} not supported; this server speaks {VERSION}")
            if not isinstance(h.get("seq"), int) or isinstance(h.get("seq"), bool):
                raise ProtocolError("bad_request", "header needs an integer 'seq'")
            if op == "generate":
                crid, params, ids, text = self.parse_generate(h, arrays)
                rid = f"{self.session}.{next(self.rids)}"
                req = Request(rid=rid, client=(ident, crid, h["seq"]), prompt=ids, params=params,
                              eos=frozenset() if params.ignore_eos else self.eos,
                              context_limit=self.max_positions, prompt_text=text,
                              detok=Detokenizer(self.decode_out, ids),
                              rng=np.random.default_rng(params.seed))
                self.controller.submit(req, (ident, crid))
            elif op == "cancel":
                crid = h.get("rid")
                if not isinstance(crid, str):
                    raise ProtocolError("bad_request", "cancel needs a string 'rid'")
                self.controller.cancel((ident, crid), (ident, h["seq"]))
            elif op == "health":
                st = self.controller.stats().get(timeout=self.cfg.controller.worker_timeout_s + 5)
                self._send(ident, ok_reply(h, name="cosine-serve", status="ok", session=self.session,
                                           mode=self.cfg.controller.mode,
                                           target=self.cfg.target_model().name,
                                           verifiers=list(st["verifiers"]),
                                           drafters={n: d["alive"] for n, d in st["drafters"].items()},
                                           max_positions=self.max_positions, vocab_size=self.vocab))
            elif op == "stats":
                n = h.get("timeline", 0)
                if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 4096:
                    raise ProtocolError("bad_request", "timeline must be an integer in [0, 4096] (rounds)")
                st = self.controller.stats(n).get(timeout=self.cfg.controller.worker_timeout_s + 5)
                st["workers"] = self.controller.worker_stats().get(timeout=self.cfg.controller.worker_timeout_s * 2 + 5)
                self._send(ident, ok_reply(h, **st))
            else:
                raise ProtocolError("unknown_op", f"unknown op {op!r}; ops: generate, cancel, health, stats")
        except ProtocolError as e:
            rep = error_reply(h, e)
            if op == "generate" and isinstance(h.get("rid"), str):
                rep["rid"] = h["rid"]
            self._send(ident, rep)
        except pykka.Timeout:
            self._send(ident, error_reply(h, ProtocolError("unavailable", "the controller did not answer in time")))
        except Exception as e:  # noqa: BLE001 - a bug on one message: answer it, keep serving
            log.exception("unhandled error on a client message (op %r)", op)
            rep = error_reply(h, ProtocolError("internal", f"{type(e).__name__} in cosine-serve; see its log"))
            if op == "generate" and isinstance(h.get("rid"), str):
                rep["rid"] = h["rid"]
            self._send(ident, rep)

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.router_sock, zmq.POLLIN)
        poller.register(self.pull, zmq.POLLIN)
        while not self.stopping.is_set():
            for sock, _ in poller.poll(200):
                if sock is self.pull:
                    while True:
                        try:
                            self.router_sock.send_multipart(self.pull.recv_multipart(zmq.NOBLOCK))
                        except zmq.Again:
                            break
                else:
                    while True:
                        try:
                            frames = self.router_sock.recv_multipart(zmq.NOBLOCK)
                        except zmq.Again:
                            break
                        try:
                            self.handle(frames)
                        except Exception:  # noqa: BLE001 - one bad message must not stop the server
                            log.exception("unhandled error on a client message")

    def close(self) -> None:
        self.stopping.set()
        try:  # tell clients of running requests, rather than leaving them to time out
            if self.controller.shutdown().get(timeout=self.cfg.controller.worker_timeout_s + 5):
                deadline = time.monotonic() + 0.5
                while time.monotonic() < deadline and self.pull.poll(50):
                    self.router_sock.send_multipart(self.pull.recv_multipart())
        except (pykka.Timeout, pykka.ActorDeadError, zmq.ZMQError) as e:
            log.warning("could not fail the running requests cleanly: %s", e)
        pykka.ActorRegistry.stop_all(timeout=10)
        self.router_sock.close(0)
        self.pull.close(0)
        stop_authenticators()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-serve", description="cosine control plane: clients connect here")
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--log-level", default=None)
    ap.add_argument("--connect-timeout", type=float, default=60.0, help="seconds to wait for the workers")
    ap.add_argument("--no-profile", action="store_true", help="skip start-up cost-model profiling")
    a = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(a.config, "cosine-serve")
    if cfg is None:
        return 2
    setup(a.log_level or cfg.logging.level, cfg.logging.file, "serve")
    try:
        server = Server(cfg, connect_timeout_s=a.connect_timeout, profile=not a.no_profile)
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
