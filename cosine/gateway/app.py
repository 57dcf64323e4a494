"""The Starlette app: routes, API keys, request bodies, /health, /v1/models, /metrics.

    POST /v1/completions        POST /v1/chat/completions     GET /v1/models[/{id}]
    GET  /health                GET  /metrics

Every answer, error or not, is counted in ``cosine:http_requests_total``; every error has
OpenAI's shape (errors.py). Only /v1/* needs the API key.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from cosine.client import AsyncClient, CosineError
from cosine.config import Config, HttpConfig
from cosine.gateway.chat import LazyChatTemplate
from cosine.gateway.errors import ApiError, bad
from cosine.gateway.generate import Backend, answer
from cosine.gateway.metrics import GatewayMetrics
from cosine.gateway.requests import chat_args, completion_args
from cosine.gateway.responses import Shape
from cosine.security import CurveKeys

log = logging.getLogger("cosine.gateway")
Handler = Callable[[Request], Awaitable[Response]]
ADMIN_TIMEOUT_S = 10.0  # health and stats calls to serve (a scrape must not hang)


def _no_constants(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


class Gateway:
    """State shared by the routes of one app."""

    def __init__(self, cfg: Config, client: AsyncClient | None = None):
        self.cfg = cfg
        self.http = cfg.http or HttpConfig()
        self.model = self.http.model_name or cfg.target_model().name
        self.keys = [k.encode() for k in self.http.api_keys]
        self.metrics = GatewayMetrics()
        self.client = client
        self.backend: Backend | None = None
        self.chat = LazyChatTemplate(cfg.engine_dir(cfg.target_model()))
        self.started = time.time()

    # -- plumbing -------------------------------------------------------------------------
    @contextlib.asynccontextmanager
    async def lifespan(self, app: Starlette) -> AsyncIterator[None]:
        if self.client is None:
            self.client = AsyncClient(self.cfg.controller.endpoint, timeout_s=self.http.request_timeout_s,
                                      curve=CurveKeys.from_config(self.cfg.security))
        self.backend = Backend(self.client, self.http.request_timeout_s, self.metrics.disconnects.inc)
        yield
        await self.backend.drain_cleanups(2.0)  # let cancels of abandoned requests reach serve
        self.client.close()

    def route(self, name: str, fn: Handler, auth: bool) -> Handler:
        async def handle(request: Request) -> Response:
            t0 = time.perf_counter()
            try:
                if auth:
                    self.check_key(request)
                resp = await fn(request)
            except ApiError as e:
                resp = e.response({"WWW-Authenticate": "Bearer"} if e.status == 401 else None)
            except Exception:  # noqa: BLE001 - a bug: answer 500, keep serving, log it
                log.exception("unhandled error on %s %s", request.method, request.url.path)
                resp = ApiError(500, "internal error in cosine-http; see its log").response()
            self.metrics.http_requests.labels(name, str(resp.status_code)).inc()
            self.metrics.http_latency.labels(name).observe(time.perf_counter() - t0)
            return resp
        return handle

    async def not_found(self, request: Request, exc: HTTPException) -> Response:
        self.metrics.http_requests.labels("unknown", str(exc.status_code)).inc()
        if exc.status_code == 405:
            return ApiError(405, f"{request.method} is not allowed on {request.url.path}").response()
        return ApiError(404, f"no such endpoint {request.url.path}; see /v1/models, /v1/completions, "
                             f"/v1/chat/completions, /health, /metrics", None, "not_found").response()

    def check_key(self, request: Request) -> None:
        if not self.keys:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        token = given.strip().encode()
        ok = False
        for k in self.keys:  # every key compared, in constant time each
            ok |= hmac.compare_digest(k, token)
        if scheme.lower() != "bearer" or not ok:
            raise ApiError(401, "missing or wrong API key: send `Authorization: Bearer KEY` with a key of "
                                "[http] api_keys", None, "invalid_api_key")

    async def read_json(self, request: Request) -> Any:
        limit = self.cfg.limits.max_message_bytes
        too_big = ApiError(413, f"request body over {limit} bytes ([limits] max_message_bytes)")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > limit:
            raise too_big

        async def body() -> bytes:
            buf = bytearray()
            async for part in request.stream():
                buf += part
                if len(buf) > limit:
                    raise too_big
            return bytes(buf)

        try:
            raw = await asyncio.wait_for(body(), self.http.body_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(408, f"request body not received within {self.http.body_timeout_s:g} s "
                                f"([http] body_timeout_s)") from None
        try:
            return json.loads(raw.decode("utf-8"), parse_constant=_no_constants)
        except UnicodeDecodeError as e:
            raise bad(f"request body is not UTF-8: {e}") from None
        except RecursionError:
            raise bad("request body is nested too deeply") from None
        except ValueError as e:
            raise bad(f"request body is not valid JSON: {e}") from None

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model:
            raise ApiError(404, f"model {model!r} not found; this server serves {self.model!r} (GET /v1/models)",
                           "model", "model_not_found")

    # -- routes ---------------------------------------------------------------------------
    async def completions(self, request: Request) -> Response:
        a = completion_args(await self.read_json(request), self.cfg)
        self.check_model(a.model)
        rid = uuid.uuid4().hex
        return await answer(request, self._backend(), Shape(False, rid, self.model), rid, a.prompt, a)

    async def chat_completions(self, request: Request) -> Response:
        a = chat_args(await self.read_json(request), self.cfg)
        self.check_model(a.model)
        ids = self.chat.get().token_ids(a.messages)
        rid = uuid.uuid4().hex
        return await answer(request, self._backend(), Shape(True, rid, self.model), rid, ids, a)

    def _backend(self) -> Backend:
        assert self.backend is not None, "the app's lifespan has not started"
        return self.backend

    def _model(self) -> dict[str, Any]:
        return {"id": self.model, "object": "model", "created": int(self.started), "owned_by": "cosine"}

    async def models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [self._model()]})

    async def model_info(self, request: Request) -> Response:
        self.check_model(request.path_params["model"])
        return JSONResponse(self._model())

    async def health(self, request: Request) -> Response:
        gateway = {"status": "ok", "model": self.model, "uptime_s": time.time() - self.started}
        assert self.client is not None
        try:
            h = await asyncio.wait_for(self.client.health(), ADMIN_TIMEOUT_S)
            st = await asyncio.wait_for(self.client.stats(), ADMIN_TIMEOUT_S)
        except (CosineError, TimeoutError) as e:
            return JSONResponse({"status": "unavailable", "gateway": gateway,
                                 "serve": {"status": "unavailable", "error": str(e) or "no answer in time"}},
                                status_code=503)
        workers = {}
        for name in [*h.get("verifiers", []), *h.get("drafters", {})]:
            w = st.get("workers", {}).get(name, {})
            alive = {**h.get("verifiers", {}), **h.get("drafters", {})}.get(name, True)  # serve's view
            up = isinstance(w, dict) and "error" not in w and alive
            workers[name] = {"role": "verifier" if name in h.get("verifiers", []) else "drafter",
                             "state": "up" if up else "down",
                             **({"error": w["error"]} if isinstance(w, dict) and "error" in w else {}),
                             **{k: w[k] for k in ("requests_held", "cache_tokens_used", "cache_tokens_budget")
                                if isinstance(w, dict) and k in w}}
        serve = {"status": h.get("status"), "endpoint": self.cfg.controller.endpoint, "mode": h.get("mode"),
                 "target": h.get("target"), "session": h.get("session"),
                 "running": st.get("active_requests"), "waiting": st.get("queued_requests")}
        ok = all(w["state"] == "up" for n, w in workers.items() if w["role"] == "verifier")
        return JSONResponse({"status": "ok" if ok else "degraded", "gateway": gateway, "serve": serve,
                             "workers": workers}, status_code=200 if ok else 503)

    async def prometheus(self, request: Request) -> Response:
        assert self.client is not None
        try:
            st = await asyncio.wait_for(self.client.stats(), ADMIN_TIMEOUT_S)
        except (CosineError, TimeoutError) as e:
            log.warning("/metrics: cosine-serve did not answer stats (%s); serving the gateway's metrics only", e)
            st = None
        self.metrics.serve.stats = st  # read by generate_latest below, with no await in between
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def create_app(cfg: Config, client: AsyncClient | None = None) -> Starlette:
    gw = Gateway(cfg, client)
    routes = [
        Route("/v1/completions", gw.route("completions", gw.completions, True), methods=["POST"]),
        Route("/v1/chat/completions", gw.route("chat_completions", gw.chat_completions, True), methods=["POST"]),
        Route("/v1/models", gw.route("models", gw.models, True), methods=["GET"]),
        Route("/v1/models/{model:path}", gw.route("models", gw.model_info, True), methods=["GET"]),
        Route("/health", gw.route("health", gw.health, False), methods=["GET"]),
        Route("/metrics", gw.route("metrics", gw.prometheus, False), methods=["GET"]),
    ]
    app = Starlette(routes=routes, lifespan=gw.lifespan,
                    exception_handlers={404: gw.not_found, 405: gw.not_found})  # type: ignore[dict-item]
    app.state.gateway = gw
    return app
