"""The frontend: the ZeroMQ ROUTER socket clients talk to, at [controller] endpoint. It
speaks the same codec as the workers (cosine.protocol); the ops (docs/serving.md):

    generate {rid?, prompt | array tokens, max_tokens, temperature, top_p, stop, mode, stream, seed}
        -> {op: "chunk", rid, text, tokens}* (stream) then {op: "done", rid, text, token_ids,
           finish_reason, stats}; or {ok: false, error}
    cancel {rid}   health   stats

The frontend thread validates and tokenizes; everything else happens in the controller.
Its events (control/wire.py) come back over an inproc PUSH/PULL pair, because only this
thread may touch the ROUTER socket.
"""

from __future__ import annotations

import itertools
import logging
import math
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pykka
import zmq
from tokenizers import Tokenizer

from cosine.config import MODES, Config, ControllerConfig, LimitsConfig
from cosine.protocol import VERSION, ProtocolError, decode, encode, error_reply, ok_reply
from cosine.security import secure_server

from .actors import ControllerPort
from .request import Detokenizer, GenParams, Mode, Request
from .wire import Event
from .wire import encode as encode_event

log = logging.getLogger("cosine.control.frontend")

MIN_TEMPERATURE = 1e-4  # smallest sampling temperature (0 = greedy); below it logits / T can overflow
GENERATE_KEYS = {"v", "op", "seq", "arrays", "rid", "prompt", "max_tokens", "temperature", "top_p", "stop",
                 "mode", "stream", "seed", "ignore_eos", "drafters"}


@dataclass(frozen=True)
class Target:
    """What the frontend knows of the target model (its engine's manifest and tokenizer)."""

    name: str
    tokenizer: Tokenizer
    vocab: int
    max_positions: int
    eos: frozenset[int]


def event_sender(ctx: zmq.Context, address: str) -> Callable[[], Callable[[Event], None]]:
    """For the controller: makes (on its own thread) the function that sends an event to the
    frontend's PULL socket at ``address``."""

    def factory() -> Callable[[Event], None]:
        push = ctx.socket(zmq.PUSH)
        push.connect(address)

        def emit(event: Event) -> None:
            ident, header = encode_event(event)
            push.send_multipart([ident, *encode(header, {})])
        return emit
    return factory


def _bad(msg: str) -> ProtocolError:
    return ProtocolError("bad_request", msg)


def _number(h: dict[str, Any], key: str, default: Any, kind: type, lo: float, hi: float, lo_open: bool = False) -> Any:
    x = h.get(key, default)
    ok_type = isinstance(x, int) if kind is int else isinstance(x, (int, float))
    if isinstance(x, bool) or not ok_type:
        raise _bad(f"{key} must be {'an integer' if kind is int else 'a number'}, got {type(x).__name__}")
    if kind is float and not math.isfinite(x):
        raise _bad(f"{key} must be finite")
    if x < lo or (lo_open and x == lo) or x > hi:
        raise _bad(f"{key} = {x} out of range {'(' if lo_open else '['}{lo}, {hi}]")
    return kind(x)


def parse_params(h: dict[str, Any], cc: ControllerConfig, lim: LimitsConfig, drafter_names: set[str]
                 ) -> tuple[str, GenParams]:
    """The client's rid and the generation parameters of a generate header."""
    unknown = sorted(str(k) for k in set(h) - GENERATE_KEYS)  # keys may be bytes: never compare mixed types
    if unknown:
        takes = sorted(GENERATE_KEYS - {"v", "op", "seq", "arrays"})
        raise _bad(f"unknown field(s) {unknown}; generate takes {takes}")
    rid = h.get("rid", None)
    if rid is None:
        rid = uuid.uuid4().hex
    if not isinstance(rid, str) or not 0 < len(rid) <= 200:
        raise _bad("rid must be a non-empty string of at most 200 characters")
    max_tokens = h.get("max_tokens", 128)
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int):
        raise _bad(f"max_tokens must be an integer, got {type(max_tokens).__name__}")
    if max_tokens < 1:
        raise _bad(f"max_tokens must be >= 1, got {max_tokens}")
    if max_tokens > lim.max_new_tokens:
        raise _bad(f"max_tokens = {max_tokens} is over the server limit {lim.max_new_tokens} (limits.max_new_tokens)")
    temperature = _number(h, "temperature", cc.temperature, float, 0.0, 100.0)
    if 0.0 < temperature < MIN_TEMPERATURE:  # logits / 1e-320 overflows: the round would fail
        raise _bad(f"temperature = {temperature} is too small to sample with; use 0 for greedy or at least "
                   f"{MIN_TEMPERATURE}")
    top_p = _number(h, "top_p", 1.0, float, 0.0, 1.0, lo_open=True)
    mode = h.get("mode", None)
    mode = cc.mode if mode is None else mode
    if mode not in MODES:
        raise _bad(f"unknown mode {mode!r}; use one of {', '.join(MODES)}")
    stop = h.get("stop", None) or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop) or len(stop) > 16:
        raise _bad("stop must be a list of at most 16 non-empty strings")
    for key in ("stream", "ignore_eos"):
        if not isinstance(h.get(key, False), bool):
            raise _bad(f"{key} must be a boolean")
    drafters = h.get("drafters", None) or []
    if not isinstance(drafters, list) or not all(isinstance(n, str) for n in drafters):
        raise _bad("drafters must be a list of drafter worker names")
    unknown = sorted(set(drafters) - drafter_names)
    if unknown:
        raise _bad(f"unknown drafter(s) {unknown}; this server has {sorted(drafter_names)}")
    seed = h.get("seed", None)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63):
        raise _bad("seed must be a non-negative integer or absent")
    return rid, GenParams(max_tokens=max_tokens, temperature=temperature, top_p=top_p, stop=tuple(stop),
                          mode=Mode(mode), stream=h.get("stream", False), seed=seed,
                          ignore_eos=h.get("ignore_eos", False), drafters=tuple(drafters))


def parse_prompt(h: dict[str, Any], arrays: dict[str, np.ndarray], target: Target, lim: LimitsConfig
                 ) -> tuple[list[int], str]:
    """The prompt's token ids and text: from the string 'prompt' or the int32 array 'tokens'."""
    has_text, has_tokens = "prompt" in h, "tokens" in arrays
    if has_text == has_tokens:
        raise _bad("give exactly one of 'prompt' (a string) or the array 'tokens' (int32)")
    if has_text:
        prompt = h["prompt"]
        if not isinstance(prompt, str):
            raise _bad(f"prompt must be a string, got {type(prompt).__name__}")
        if len(prompt) > 64 * lim.max_prompt_tokens:
            raise ProtocolError("too_long", f"prompt of {len(prompt)} characters is over the limit")
        ids, text = target.tokenizer.encode(prompt).ids, prompt
    else:
        a = arrays["tokens"]
        if a.ndim != 1 or a.dtype.name not in ("int32", "int64"):
            raise _bad(f"tokens must be a 1-D int32 array, got {a.dtype.name}{list(a.shape)}")
        if a.size and (a.min() < 0 or a.max() >= target.vocab):
            raise _bad(f"token ids must be in [0, {target.vocab})")
        ids = [int(x) for x in a]
        text = target.tokenizer.decode(ids)
    if not ids:
        raise _bad("empty prompt: give at least one token")
    if len(ids) > lim.max_prompt_tokens:
        raise ProtocolError("too_long", f"prompt has {len(ids)} tokens; the limit is {lim.max_prompt_tokens} "
                                        f"(limits.max_prompt_tokens)")
    if len(ids) >= target.max_positions:
        raise ProtocolError("too_long", f"prompt has {len(ids)} tokens; the model's context is "
                                        f"{target.max_positions} positions, which leaves no room to generate")
    return ids, text


class Frontend:
    """The ROUTER socket and the loop that serves it (``serve_forever``, until ``stopping``)."""

    def __init__(self, cfg: Config, controller: ControllerPort, target: Target, decode_out: Callable[[list[int]], str],
                 drafter_names: set[str], session: str, events: zmq.Socket, ctx: zmq.Context):
        self.cfg, self.controller, self.target = cfg, controller, target
        self.decode_out = decode_out      # the controller's own tokenizer copy, for detokenizing output
        self.drafter_names, self.session = drafter_names, session
        self.events = events              # PULL: the controller's events
        self.sock = ctx.socket(zmq.ROUTER)
        self.sock.setsockopt(zmq.LINGER, 0)
        cc = cfg.controller
        secure_server(self.sock, cfg.security, endpoint=cc.endpoint, max_message_bytes=cfg.limits.max_message_bytes,
                      what="cosine-serve")
        self.sock.bind(cc.endpoint)
        self.rids = itertools.count(1)
        self.stopping = threading.Event()
        self.answer_s = cc.worker_timeout_s + 5   # how long a health or stats reply may take

    def _send(self, ident: bytes, header: dict[str, Any]) -> None:
        self.sock.send_multipart([ident, *encode(header, {})])

    def handle(self, frames: list[bytes]) -> None:
        """One client message: answered here (errors, health, stats) or handed to the controller."""
        ident, body = frames[0], frames[1:]
        try:
            h, arrays = decode(body)
        except ProtocolError as e:
            self._send(ident, error_reply(None, e))
            return
        op = h.get("op")
        try:
            if h.get("v") != VERSION:
                raise ProtocolError("version", f"protocol version {h.get('v')!r} not supported; "
                                               f"this server speaks {VERSION}")
            if not isinstance(h.get("seq"), int) or isinstance(h.get("seq"), bool):
                raise ProtocolError("bad_request", "header needs an integer 'seq'")
            ops = {"generate": self._generate, "cancel": self._cancel, "health": self._health, "stats": self._stats}
            if not isinstance(op, str) or op not in ops:  # op may be any msgpack value
                raise ProtocolError("unknown_op", f"unknown op {op!r}; ops: generate, cancel, health, stats")
            ops[op](ident, h, arrays)
        except ProtocolError as e:
            self._send(ident, self._error(h, op, e))
        except pykka.Timeout:
            self._send(ident, error_reply(h, ProtocolError("unavailable", "the controller did not answer in time")))
        except Exception as e:  # noqa: BLE001 - a bug on one message: answer it, keep serving
            log.exception("unhandled error on a client message (op %r)", op)
            self._send(ident, self._error(h, op, ProtocolError("internal", f"{type(e).__name__} in cosine-serve; "
                                                                           "see its log")))

    @staticmethod
    def _error(h: dict[str, Any], op: Any, e: ProtocolError) -> dict[str, Any]:
        rep = error_reply(h, e)
        if op == "generate" and isinstance(h.get("rid"), str):
            rep["rid"] = h["rid"]
        return rep

    def _generate(self, ident: bytes, h: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        crid, params = parse_params(h, self.cfg.controller, self.cfg.limits, self.drafter_names)
        ids, text = parse_prompt(h, arrays, self.target, self.cfg.limits)
        req = Request(rid=f"{self.session}.{next(self.rids)}", client=(ident, crid, h["seq"]), prompt=ids,
                      params=params, eos=frozenset() if params.ignore_eos else self.target.eos,
                      context_limit=self.target.max_positions, prompt_text=text,
                      detok=Detokenizer(self.decode_out, ids), rng=np.random.default_rng(params.seed))
        self.controller.submit(req, (ident, crid))

    def _cancel(self, ident: bytes, h: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        crid = h.get("rid")
        if not isinstance(crid, str):
            raise ProtocolError("bad_request", "cancel needs a string 'rid'")
        self.controller.cancel((ident, crid), (ident, h["seq"]))

    def _health(self, ident: bytes, h: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        st = self.controller.stats().get(timeout=self.answer_s)
        self._send(ident, ok_reply(h, name="cosine-serve", status="ok", session=self.session,
                                   mode=self.cfg.controller.mode, target=self.target.name,
                                   verifiers={n: v["alive"] for n, v in st["verifiers"].items()},
                                   drafters={n: d["alive"] for n, d in st["drafters"].items()},
                                   max_positions=self.target.max_positions, vocab_size=self.target.vocab))

    def _stats(self, ident: bytes, h: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        n = h.get("timeline", 0)
        if isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= 4096:
            raise ProtocolError("bad_request", "timeline must be an integer in [0, 4096] (rounds)")
        st = self.controller.stats(n).get(timeout=self.answer_s)
        st["workers"] = self.controller.worker_stats().get(timeout=self.cfg.controller.worker_timeout_s * 2 + 5)
        self._send(ident, ok_reply(h, **st))

    def serve_forever(self) -> None:
        poller = zmq.Poller()
        poller.register(self.sock, zmq.POLLIN)
        poller.register(self.events, zmq.POLLIN)
        while not self.stopping.is_set():
            for sock, _ in poller.poll(200):
                if sock is self.events:
                    self._forward_events()
                    continue
                while True:
                    try:
                        frames = self.sock.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    try:
                        self.handle(frames)
                    except Exception:  # noqa: BLE001 - one bad message must not stop the server
                        log.exception("unhandled error on a client message")

    def _forward_events(self) -> None:
        while True:
            try:
                self.sock.send_multipart(self.events.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                return

    def drain(self, seconds: float) -> None:
        """Send the events still coming for up to ``seconds`` (shutdown)."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline and self.events.poll(50):
            self.sock.send_multipart(self.events.recv_multipart())

    def close(self) -> None:
        self.sock.close(0)
        self.events.close(0)
