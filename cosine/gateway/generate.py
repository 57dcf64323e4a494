"""One generation through cosine-serve, answered as JSON or as server-sent events.

A client that goes away cancels its request in serve: the disconnect is watched while
waiting for serve (non-streaming, and before a stream's first token) and ends a running
stream (Starlette cancels its body iterator); either way ``Backend.abandon`` sends serve
a `cancel` and reads the request's remaining replies, so nothing is left behind.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

from cosine.client import AsyncClient, AsyncStream, Chunk, CosineError
from cosine.gateway.errors import from_serve
from cosine.gateway.requests import GenArgs
from cosine.gateway.responses import Shape

log = logging.getLogger("cosine.gateway")
T = TypeVar("T")
DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The HTTP client disconnected before its answer was ready."""


def sse(obj: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False, separators=(",", ":")).encode() + b"\n\n"


async def _disconnected(request: Request) -> None:
    """Returns when the client disconnects (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def unless_gone(request: Request, work: Awaitable[T]) -> T:
    """``await work``, unless the client disconnects first: then cancel it, raise ClientGone."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
    if task.done() and not task.cancelled():
        return task.result()
    raise ClientGone


class Backend:
    """The gateway's one connection to cosine-serve, shared by all HTTP requests."""

    def __init__(self, client: AsyncClient, timeout_s: float, on_disconnect: Callable[[], None]):
        self.client, self.timeout_s, self.on_disconnect = client, timeout_s, on_disconnect
        self._cleanups: set[asyncio.Task] = set()

    async def start(self, rid: str, prompt: str | list[int], a: GenArgs) -> AsyncStream:
        """Always a stream from serve, also for a JSON answer: the gateway can then give up
        on it (client gone) and still read its last replies."""
        s = await self.client.generate(prompt, max_tokens=a.max_tokens, temperature=a.temperature, top_p=a.top_p,
                                       stop=a.stop, mode=a.mode, stream=True, seed=a.seed,
                                       timeout_s=self.timeout_s, rid=rid, ignore_eos=a.ignore_eos,
                                       drafters=a.drafters)
        assert isinstance(s, AsyncStream)
        return s

    def abandon(self, s: AsyncStream) -> None:
        """The client is gone: cancel the request in serve and consume its last replies."""
        self.on_disconnect()
        log.info("client of request %s disconnected; cancelling it in cosine-serve", s.rid)
        t = asyncio.get_running_loop().create_task(self._cancel(s))
        self._cleanups.add(t)
        t.add_done_callback(self._cleanups.discard)

    async def _cancel(self, s: AsyncStream) -> None:
        try:
            await self.client.cancel(s.rid)
        except CosineError as e:  # it finished meanwhile (unknown_request), or serve is gone
            log.debug("cancel of %s: %s", s.rid, e)
        try:
            async for _ in s:  # until its `cancelled` error or `done`: the client forgets the rid
                pass
        except CosineError:
            pass

    async def drain_cleanups(self, timeout_s: float) -> None:
        if self._cleanups:
            await asyncio.wait(set(self._cleanups), timeout=timeout_s)


async def _all(s: AsyncStream) -> Any:
    async for _ in s:
        pass
    return s.result


async def answer(request: Request, backend: Backend, shape: Shape, rid: str, prompt: str | list[int],
                 a: GenArgs) -> Response:
    """Run the generation; a JSON response, or an SSE stream once the first token is there
    (so that serve's refusals still get their HTTP status). Raises ApiError."""
    s = await backend.start(rid, prompt, a)
    it = s.__aiter__()
    try:
        first = await unless_gone(request, _all(s) if not a.stream else _next(it))
    except ClientGone:
        backend.abandon(s)
        return Response(status_code=499)  # nobody reads it; logged and counted as a disconnect
    except CosineError as e:
        raise from_serve(e) from None
    if not a.stream:
        return JSONResponse(shape.full(first))
    return StreamingResponse(_events(backend, shape, s, it, first, a.include_usage), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def _next(it: AsyncIterator[Chunk]) -> Chunk | None:
    try:
        return await it.__anext__()
    except StopAsyncIteration:
        return None


async def _events(backend: Backend, shape: Shape, s: AsyncStream, it: AsyncIterator[Chunk], first: Chunk | None,
                  include_usage: bool) -> AsyncIterator[bytes]:
    """The SSE events of a stream. Events whose replies are already here go out in one write
    (the role and the first text; the last text, the finish and [DONE]): each write is a
    syscall and a wake-up of the client."""
    finished = False
    ready: list[bytes] = []
    try:
        if shape.chat:
            ready.append(sse(shape.chunk("", role=True)))
        if first is not None and first.text:
            ready.append(sse(shape.chunk(first.text)))
        ch = first
        while ch is not None:
            if ready and not s.has_next():
                yield b"".join(ready)
                ready = []
            ch = await _next(it)
            if ch is not None and ch.text:  # serve holds back text that may start a stop string or a UTF-8 character
                ready.append(sse(shape.chunk(ch.text)))
        finished = True
        assert s.result is not None
        ready += [sse(c) for c in shape.last_chunks(s.result, include_usage)]
    except CosineError as e:  # after the 200: OpenAI's SDKs raise on an `error` event
        finished = True
        log.warning("request %s failed mid-stream: %s", s.rid, e)
        ready.append(sse(from_serve(e).body()))
    finally:
        if not finished:
            backend.abandon(s)
    yield b"".join(ready) + DONE
