"""OpenAI request bodies -> validated generation arguments (docs/http.md, Requests).

Every field is checked here, before anything reaches cosine-serve; a mistake is a 400
that names the field. OpenAI fields cosine does not implement are accepted at their
neutral values only (SDKs and frameworks send them by default); fields no OpenAI API
has are refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable

from cosine.config import MODES, Config
from cosine.gateway.errors import ApiError, bad

MAX_STOP = 16          # stop strings per request (cosine-serve's limit)
MAX_ID = 2 ** 31 - 1   # token ids travel as int32
MAX_SEED = 2 ** 63 - 1


def _none(v: Any) -> bool:
    return v is None


def _zero(v: Any) -> bool:
    return v is None or (type(v) in (int, float) and v == 0)


def _one(v: Any) -> bool:
    return v is None or (type(v) is int and v == 1)


def _false(v: Any) -> bool:
    return v is None or v is False


def _empty(v: Any) -> bool:
    return v is None or v == {} or v == []


def _any_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _any_bool(v: Any) -> bool:
    return v is None or isinstance(v, bool)


def _str_dict(v: Any) -> bool:
    return v is None or isinstance(v, dict) and all(isinstance(k, str) and isinstance(x, str) for k, x in v.items())


# Accepted and ignored at these values; anything else is a 400 naming the field.
NEUTRAL: dict[str, Callable[[Any], bool]] = {
    "n": _one, "presence_penalty": _zero, "frequency_penalty": _zero, "logit_bias": _empty, "user": _any_str,
    "service_tier": lambda v: v in (None, "auto", "default"),
}
NEUTRAL_COMPLETIONS = {**NEUTRAL, "logprobs": _none, "best_of": _one, "echo": _false,
                       "suffix": lambda v: v in (None, "")}
NEUTRAL_CHAT = {
    **NEUTRAL, "logprobs": _false, "top_logprobs": _zero, "tools": _empty, "functions": _empty,
    "tool_choice": lambda v: v in (None, "none", "auto"), "function_call": lambda v: v in (None, "none", "auto"),
    "parallel_tool_calls": _any_bool, "response_format": lambda v: v is None or v == {"type": "text"},
    "modalities": lambda v: v is None or v == ["text"], "audio": _none, "prediction": _none,
    "reasoning_effort": _none, "web_search_options": _none, "verbosity": _none, "store": _false,
    "metadata": _str_dict, "prompt_cache_key": _any_str, "safety_identifier": _any_str,
}
USED = {"model", "max_tokens", "temperature", "top_p", "seed", "stop", "stream", "stream_options"}
COSINE_EXTRAS = {"mode", "drafters", "ignore_eos"}
COMPLETION_FIELDS = USED | {"prompt"} | set(NEUTRAL_COMPLETIONS) | COSINE_EXTRAS
CHAT_FIELDS = USED | {"messages", "max_completion_tokens"} | set(NEUTRAL_CHAT) | COSINE_EXTRAS
ROLES = ("system", "user", "assistant", "developer")  # developer: OpenAI's newer name for system


@dataclass
class GenArgs:
    """One validated generation request (prompt: text, token ids, or chat messages)."""

    prompt: str | list[int] | None
    messages: list[dict[str, str]] | None
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stream: bool = False
    include_usage: bool = False
    model: str | None = None
    mode: str | None = None
    drafters: list[str] = field(default_factory=list)
    ignore_eos: bool = False


def _number(body: dict[str, Any], key: str, default: float, lo: float, hi: float, lo_open: bool = False) -> float:
    v = body.get(key)
    if v is None:
        return default
    if type(v) not in (int, float):
        raise bad(f"{key} must be a number, got {type(v).__name__}", key)
    if not math.isfinite(v) or v < lo or (lo_open and v == lo) or v > hi:
        raise bad(f"{key} = {v} is out of range {'(' if lo_open else '['}{lo}, {hi}]", key)
    return float(v)


def _integer(body: dict[str, Any], key: str, lo: int, hi: int, what: str = "") -> int | None:
    v = body.get(key)
    if v is None:
        return None
    if type(v) is not int:
        raise bad(f"{key} must be an integer, got {type(v).__name__}", key)
    if not lo <= v <= hi:
        raise bad(f"{key} = {v} is out of range [{lo}, {hi}]{what}", key)
    return v


def _check_fields(body: Any, known: set[str], neutral: dict[str, Callable[[Any], bool]]) -> dict[str, Any]:
    if not isinstance(body, dict):
        raise bad(f"the request body must be a JSON object, got {type(body).__name__}")
    unknown = sorted(set(body) - known)
    if unknown:
        raise bad(f"unknown field {unknown[0]!r}: no OpenAI API has it and cosine does not either "
                  f"(cosine's own fields: {', '.join(sorted(COSINE_EXTRAS))})", unknown[0])
    if not _one(body.get("n")):
        raise bad(f"n = {_short(body['n'])} is not supported: cosine returns one choice per request, n must be 1",
                  "n")
    for k, ok in neutral.items():
        if k in body and not ok(body[k]):
            raise bad(f"{k} = {_short(body[k])} is not supported: cosine accepts {k} only at its neutral "
                      f"value (OpenAI's default); leave it out", k)
    return body


def _short(v: Any) -> str:
    s = repr(v)
    return s if len(s) <= 60 else s[:57] + "..."


def _common(body: dict[str, Any], cfg: Config, max_tokens: int | None, default_max: int) -> GenArgs:
    limit = cfg.limits.max_new_tokens
    if max_tokens is not None and max_tokens > limit:
        raise bad(f"max_tokens = {max_tokens} is over the server limit {limit} ([limits] max_new_tokens)",
                  "max_tokens")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {type(model).__name__}", "model")
    stop = body.get("stop")
    stop = [] if stop is None else [stop] if isinstance(stop, str) else stop
    if not isinstance(stop, list) or len(stop) > MAX_STOP or not all(isinstance(s, str) and s for s in stop):
        raise bad(f"stop must be a non-empty string or a list of at most {MAX_STOP} non-empty strings", "stop")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream must be a boolean", "stream")
    opts = body.get("stream_options")
    if opts is not None and (not isinstance(opts, dict) or set(opts) - {"include_usage", "include_obfuscation"}
                             or not all(isinstance(v, bool) for v in opts.values())):
        raise bad("stream_options must be an object with the boolean include_usage", "stream_options")
    mode = body.get("mode")
    if mode is not None and mode not in MODES:
        raise bad(f"mode must be one of {', '.join(MODES)}, got {_short(mode)}", "mode")
    drafters = body.get("drafters")
    if drafters is not None and (not isinstance(drafters, list) or not all(isinstance(d, str) for d in drafters)):
        raise bad("drafters must be a list of drafter worker names", "drafters")
    ignore_eos = body.get("ignore_eos")
    if ignore_eos is not None and not isinstance(ignore_eos, bool):
        raise bad("ignore_eos must be a boolean", "ignore_eos")
    return GenArgs(
        prompt=None, messages=None, max_tokens=default_max if max_tokens is None else max_tokens,
        temperature=_number(body, "temperature", cfg.controller.temperature, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_integer(body, "seed", 0, MAX_SEED), stop=stop, stream=bool(stream),
        include_usage=bool((opts or {}).get("include_usage")), model=model, mode=mode,
        drafters=list(drafters or []), ignore_eos=bool(ignore_eos))


def _max_tokens(body: dict[str, Any], key: str) -> int | None:
    return _integer(body, key, 1, 2 ** 53, " (at least one token)")


def completion_args(body: Any, cfg: Config) -> GenArgs:
    """POST /v1/completions. max_tokens defaults to 16, as OpenAI's."""
    body = _check_fields(body, COMPLETION_FIELDS, NEUTRAL_COMPLETIONS)
    if "prompt" not in body:
        raise bad("prompt is required: a string or a list of token ids", "prompt")
    args = _common(body, cfg, _max_tokens(body, "max_tokens"), 16)
    args.prompt = _prompt(body["prompt"], cfg)
    return args


def _prompt(p: Any, cfg: Config) -> str | list[int]:
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]  # a batch of one prompt
    if isinstance(p, str):
        check_text_size(p, cfg)
        return p
    if isinstance(p, list) and all(type(t) is int for t in p):
        if not all(0 <= t <= MAX_ID for t in p):
            raise bad("token ids must be non-negative int32 values", "prompt")
        if len(p) > cfg.limits.max_prompt_tokens:
            raise ApiError(400, f"prompt has {len(p)} tokens; the limit is {cfg.limits.max_prompt_tokens} "
                                f"([limits] max_prompt_tokens)", "prompt", "context_length_exceeded")
        return p
    raise bad("prompt must be a string, a list of token ids, or a list holding one of those "
              "(cosine serves one prompt per request)", "prompt")


def check_text_size(text: str, cfg: Config) -> None:
    """Refuse text far over the token limit before tokenizing it (as cosine-serve does)."""
    n = cfg.limits.max_prompt_tokens
    if len(text) > 64 * n:
        raise ApiError(400, f"prompt of {len(text)} characters is over the limit of {n} tokens "
                            f"([limits] max_prompt_tokens)", "prompt", "context_length_exceeded")


def chat_args(body: Any, cfg: Config) -> GenArgs:
    """POST /v1/chat/completions. max_completion_tokens (or max_tokens) defaults to the
    server limit: generation ends at EOS, a stop string or the model's context."""
    body = _check_fields(body, CHAT_FIELDS, NEUTRAL_CHAT)
    n = _max_tokens(body, "max_completion_tokens")
    n = _max_tokens(body, "max_tokens") if n is None else n
    args = _common(body, cfg, n, cfg.limits.max_new_tokens)
    args.messages = _messages(body.get("messages"))
    check_text_size("".join(m["content"] for m in args.messages), cfg)
    return args


def _messages(ms: Any) -> list[dict[str, str]]:
    if not isinstance(ms, list) or not ms:
        raise bad("messages must be a non-empty list of {role, content} objects", "messages")
    return [_message(m, i) for i, m in enumerate(ms)]


def _message(m: Any, i: int) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad(f"{where} must be an object with role and content", where)
    extra = sorted(k for k in set(m) - {"role", "content", "name"}
                   if not (k in ("tool_calls", "function_call", "refusal", "audio") and _empty(m[k])))
    if extra:
        raise bad(f"{where}.{extra[0]} is not supported (cosine has no tools or audio)", f"{where}.{extra[0]}")
    role = m.get("role")
    if role not in ROLES:
        raise bad(f"{where}.role must be one of system, user, assistant, got {_short(role)}", f"{where}.role")
    content = m.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, list):
        if not all(isinstance(c, dict) and c.get("type") == "text" and isinstance(c.get("text"), str)
                   and set(c) <= {"type", "text"} for c in content):
            raise bad(f"{where}.content parts must be {{\"type\": \"text\", \"text\": ...}} (cosine reads text only)",
                      f"{where}.content")
        content = "".join(c["text"] for c in content)
    if not isinstance(content, str):
        raise bad(f"{where}.content must be a string or a list of text parts", f"{where}.content")
    out = {"role": "system" if role == "developer" else role, "content": content}
    if m.get("name") is not None:
        if not isinstance(m["name"], str):
            raise bad(f"{where}.name must be a string", f"{where}.name")
        out["name"] = m["name"]
    return out
