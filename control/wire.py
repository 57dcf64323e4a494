"""The controller's side of the client wire format (docs/serving.md).

The round emits events (``Chunk``, ``Done``, ``Failed``, and ``CancelReply`` for a cancel);
``encode`` turns one into the reply a client reads, framed by cosine.protocol. The one
map from worker errors to client error codes is ``client_code``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Union

from cosine.protocol import VERSION

# A generate's reply address: (frontend connection identity, the client's rid, its seq).
Address = tuple[Any, str, int]


@dataclass(frozen=True)
class Chunk:
    """Streamed output of one round (``stream: true``)."""

    to: Address
    text: str
    tokens: list[int]


@dataclass(frozen=True)
class Done:
    to: Address
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stats: dict[str, Any]


@dataclass(frozen=True)
class Failed:
    to: Address
    code: str
    message: str


@dataclass(frozen=True)
class CancelReply:
    to: tuple[Any, int]      # (frontend connection identity, the cancel's seq)
    rid: str                 # the client's rid
    error: str | None = None  # None: cancelled; else why not (unknown_request)


Event = Union[Chunk, Done, Failed, CancelReply]


def encode(event: Event) -> tuple[Any, dict[str, Any]]:
    """(connection identity, reply header) of an event."""
    if isinstance(event, CancelReply):
        ident, seq = event.to
        h: dict[str, Any] = {"v": VERSION, "op": "cancel", "seq": seq}
        if event.error is None:
            return ident, {**h, "ok": True, "rid": event.rid}
        return ident, {**h, "ok": False, "error": {"code": "unknown_request", "message": event.error}}
    ident, rid, seq = event.to
    h = {"v": VERSION, "seq": seq, "rid": rid}
    if isinstance(event, Chunk):
        return ident, {**h, "op": "chunk", "ok": True, "text": event.text, "tokens": event.tokens}
    if isinstance(event, Done):
        return ident, {**h, "op": "done", "ok": True, "text": event.text, "token_ids": event.token_ids,
                       "finish_reason": event.finish_reason, "stats": event.stats}
    return ident, {**h, "op": "generate", "ok": False, "error": {"code": event.code, "message": event.message}}


# Worker error codes that mean something to the client; every other one is the server's fault.
_WORKER_TO_CLIENT = {"too_long": "too_long", "capacity": "overloaded"}


def client_code(error: str | None, worker_code: str | None) -> str:
    """The client's error code for a failed worker call: a worker that is gone or silent
    (``error == "dead"``) -> unavailable; a request too long for the worker -> too_long; no
    KV room -> overloaded; anything else -> internal."""
    if error == "dead":
        return "unavailable"
    return _WORKER_TO_CLIENT.get(worker_code or "", "internal")
