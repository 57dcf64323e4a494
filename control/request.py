"""Per-request state of the control plane: committed tokens, output, detokenization, stops.

Pure Python (no actors, no sockets) so the emit/stop rules can be tested alone.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Callable

import numpy as np


class Mode(StrEnum):
    """How a request is decoded; chosen once, when the frontend accepts it (the values are
    the wire names of config.MODES)."""

    AUTOREGRESSIVE = "autoregressive"  # plain decoding: the target verifies its root alone
    SPECULATIVE = "speculative"        # one drafter's chain per round
    SPECINFER = "specinfer"            # every drafter's chain, merged into one tree
    COSINE = "cosine"                  # routed drafters, fused per step, adaptive speculation


@dataclass(frozen=True)
class GenParams:
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    stop: tuple[str, ...] = ()
    mode: Mode = Mode.COSINE
    stream: bool = False
    seed: int | None = None
    ignore_eos: bool = False  # benchmarks: run to max_tokens
    drafters: tuple[str, ...] = ()  # only these drafter workers (empty = any); benchmarks pin one


class Detokenizer:
    """Incremental detokenization with a two-offset window (as vLLM / HF streamers do).

    Decoding ``ids[prefix:]`` and ``ids[prefix:read]`` from the same start token keeps
    tokenizer quirks (leading-space stripping, multi-byte characters split over tokens)
    identical in both, so the difference is exactly the new text. Text is held back while
    it ends in U+FFFD (an incomplete UTF-8 sequence).
    """

    def __init__(self, decode: Callable[[list[int]], str], prompt_ids: list[int]):
        self._decode = decode
        self.ids: list[int] = list(prompt_ids[-6:])  # a little context for the first tokens
        self.prefix = 0
        self.read = len(self.ids)

    def push(self, token: int) -> str:
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            delta = new_text[len(prefix_text):]
            self.prefix, self.read = self.read, len(self.ids)
            return delta
        return ""

    def flush(self) -> str:
        prefix_text = self._decode(self.ids[self.prefix:self.read])
        new_text = self._decode(self.ids[self.prefix:])
        self.prefix = self.read = len(self.ids)
        return new_text[len(prefix_text):] if len(new_text) > len(prefix_text) else ""


@dataclass(eq=False)  # identity: requests are compared and removed by object, never by value
class Request:
    """One generation. ``committed`` = prompt + accepted output (the last one is the root)."""

    rid: str                     # internal id used on the workers (unique per server)
    client: Any                  # opaque reply address (frontend identity, client rid, seq)
    prompt: list[int]
    params: GenParams
    eos: frozenset[int]
    context_limit: int           # max committed length (target max_positions)
    detok: Detokenizer
    verifier: int = 0            # index of the verifier that holds it
    prompt_text: str = ""
    rng: np.random.Generator = field(default_factory=np.random.default_rng)
    committed: list[int] = field(default_factory=list)
    output: list[int] = field(default_factory=list)
    text: str = ""               # text emitted so far (concatenation of chunks)
    pending_text: str = ""       # decoded but held back (may start a stop string)
    finish_reason: str | None = None
    # across rounds (a round's own scratch travels in its Draft, control/drafting/trees.py)
    drafted: bool = False                            # has speculated at least once (drafters hold its prompt)
    warmed: set[str] = field(default_factory=set)    # model drafters done prefilling it (or that never will)
    engaged: set[str] = field(default_factory=set)   # model drafters that draft for it (control/drafting/engagement.py)
    commit_nodes: list[int] | None = None            # accepted nodes of the last verify (inline commit)
    client_key: Any = None
    domain: str = ""
    kv_reserved: int = 0                             # worst-case KV tokens reserved on its verifier
    queued: bool = False                             # had to wait for KV room before admission
    parked_since: float | None = None                # its verifier was lost: waiting to be prefilled again
    parked_on: str = ""                              # ... the verifier it was lost with
    resumes: int = 0                                 # times it was prefilled again after a verifier loss
    # stats
    arrived: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    rounds: int = 0
    accepted_drafts: int = 0
    drafters_used: set[str] = field(default_factory=set)
    wait_since: float = field(default_factory=time.monotonic)  # ready to verify since (scheduling)

    def __post_init__(self) -> None:
        if not self.committed:
            self.committed = list(self.prompt)

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    def accept(self, tokens: list[int]) -> tuple[str, list[int]]:
        """Append a round's accepted tokens (bonus included) up to the first stop.

        Returns the (text, token ids) to stream now. Sets ``finish_reason`` when a stop
        condition hits; tokens after it are dropped (they are never committed either,
        since a finished request is released).
        """
        if self.first_token_at is None:
            self.first_token_at = time.monotonic()
        new_ids: list[int] = []
        for t in tokens:
            if t in self.eos:
                self.finish_reason = "eos"
                break
            self.committed.append(t)
            self.output.append(t)
            new_ids.append(t)
            self.pending_text += self.detok.push(t)
            if self._check_stop():
                break
            if len(self.output) >= self.params.max_tokens or len(self.committed) >= self.context_limit:
                self.finish_reason = "length"
                break
        if self.finish_reason and self.finish_reason != "stop":
            self.pending_text += self.detok.flush()
            self._check_stop()
        return self._release_text(), new_ids

    def _check_stop(self) -> bool:
        for s in self.params.stop:
            i = self.pending_text.find(s)
            if i >= 0:
                self.pending_text = self.pending_text[:i]
                self.finish_reason = "stop"
                return True
        return False

    def _release_text(self) -> str:
        """Move pending text to emitted text, holding back a possible stop-string start."""
        hold = 0
        if not self.done:
            for s in self.params.stop:
                for k in range(min(len(s) - 1, len(self.pending_text)), 0, -1):
                    if self.pending_text.endswith(s[:k]):
                        hold = max(hold, k)
                        break
        out = self.pending_text[:len(self.pending_text) - hold]
        self.pending_text = self.pending_text[len(out):]
        self.text += out
        return out

    def stats(self) -> dict[str, Any]:
        now = time.monotonic()
        latency = now - self.arrived
        n = len(self.output)
        return {
            "tokens": n,
            "rounds": self.rounds,
            "mean_accepted_length": 1.0 + self.accepted_drafts / self.rounds if self.rounds else 1.0,
            "drafters_used": sorted(self.drafters_used),
            "ttft_s": (self.first_token_at or now) - self.arrived,
            "latency_s": latency,
            "tokens_per_s": n / latency if latency > 0 else 0.0,
            "mode": str(self.params.mode),
        }


@dataclass
class Failure:
    """A request a phase could not serve: the client gets ``code`` and ``message``."""

    request: Request
    code: str
    message: str
