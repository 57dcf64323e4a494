"""serve's results -> OpenAI response and stream-chunk objects (docs/http.md, Responses).

Besides OpenAI's fields every response carries ``speculation``: cosine's per-request
figures, with vLLM's names where they mean the same thing (docs/http.md has the table)."""

from __future__ import annotations

import time
from typing import Any

from cosine.client import GenerateResult

FINISH = {"eos": "stop", "stop": "stop", "length": "length"}  # serve's reasons -> OpenAI's
SPECULATION_KEYS = ("mode", "drafters_used", "rounds", "num_drafts", "num_draft_tokens", "num_accepted_tokens",
                    "draft_acceptance_rate", "mean_acceptance_length", "ttft_s")


def speculation(stats: dict[str, Any]) -> dict[str, Any]:
    """The per-request figures of serve's `done` stats (control/metrics.py, pool.py)."""
    return {k: stats.get(k) for k in SPECULATION_KEYS}


def usage(r: GenerateResult) -> dict[str, int]:
    p, c = int(r.stats.get("prompt_tokens", 0)), len(r.token_ids)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Shape:
    """The objects of one response: completion ("text_completion") or chat ("chat.completion")."""

    def __init__(self, chat: bool, rid: str, model: str):
        self.chat, self.model = chat, model
        self.id = ("chatcmpl-" if chat else "cmpl-") + rid
        self.created = int(time.time())

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}

    def full(self, r: GenerateResult) -> dict[str, Any]:
        """The non-streaming response."""
        reason = FINISH.get(r.finish_reason, r.finish_reason)
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "logprobs": None,
                      "finish_reason": reason}
        else:
            choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": reason}
        return {**self._head("chat.completion" if self.chat else "text_completion"), "choices": [choice],
                "usage": usage(r), "speculation": speculation(r.stats)}

    def chunk(self, text: str | None, reason: str | None = None, role: bool = False) -> dict[str, Any]:
        """A stream chunk with ``text`` (chat: the first one also names the role)."""
        if self.chat:
            delta: dict[str, Any] = {"role": "assistant"} if role else {}
            if text is not None:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        return {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [choice]}

    def last_chunks(self, r: GenerateResult, include_usage: bool) -> list[dict[str, Any]]:
        """The finish chunk, then (stream_options.include_usage) the usage chunk with no
        choices; the speculation figures ride on the last of them."""
        end = self.chunk(None if self.chat else "", FINISH.get(r.finish_reason, r.finish_reason))
        if not include_usage:
            return [{**end, "speculation": speculation(r.stats)}]
        tail = {**self._head("chat.completion.chunk" if self.chat else "text_completion"), "choices": [],
                "usage": usage(r), "speculation": speculation(r.stats)}
        return [end, tail]
