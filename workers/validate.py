"""Field checks for untrusted request headers and arrays.

Every failure is a ProtocolError("bad_request") whose message names the field (and the
rid when there is one), so a client can fix its call from the error alone.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from cosine.protocol import ProtocolError

_MISSING = object()


def bad(msg: str) -> ProtocolError:
    return ProtocolError("bad_request", msg)


def is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def requests(header: Mapping[str, Any], allowed: set[str], dup_code: str = "bad_request") -> list[dict[str, Any]]:
    """header["requests"] as a list of maps with a string rid, no rid twice, no unknown keys."""
    reqs = header.get("requests")
    if not isinstance(reqs, list):
        raise bad(f"header 'requests' must be a list of maps, got {type(reqs).__name__}")
    seen: set[str] = set()
    for i, r in enumerate(reqs):
        if not isinstance(r, dict):
            raise bad(f"requests[{i}] must be a map, got {type(r).__name__}")
        rid = r.get("rid")
        if not isinstance(rid, str) or not rid:
            raise bad(f"requests[{i}].rid must be a non-empty string, got {rid!r}")
        if rid in seen:
            raise ProtocolError(dup_code, f"request {rid!r} appears twice in one message")
        seen.add(rid)
        unknown = sorted(set(r) - allowed - {"rid"})
        if unknown:
            raise bad(f"request {rid!r}: unknown field {unknown[0]!r}; known: {sorted(allowed)}")
    return reqs


def int_field(r: Mapping[str, Any], key: str, lo: int, hi: int | None = None, default: Any = _MISSING,
              nullable: bool = False) -> Any:
    v = r.get(key, default)
    if v is _MISSING:
        raise bad(f"request {r.get('rid')!r}: missing field {key!r}")
    if v is None and (nullable or default is None):
        return None
    if not is_int(v) or v < lo or (hi is not None and v > hi):
        rng = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        raise bad(f"request {r.get('rid')!r}: {key} must be an int {rng}, got {v!r}")
    return v


def float_field(r: Mapping[str, Any], key: str, lo: float, default: float) -> float:
    v = r.get(key, default)
    if not (is_int(v) or isinstance(v, float)) or not math.isfinite(v) or v < lo:
        raise bad(f"request {r.get('rid')!r}: {key} must be a finite number >= {lo}, got {v!r}")
    return float(v)


# Smallest sampling temperature a worker accepts (0 = greedy): logits / T must not overflow.
MIN_TEMPERATURE = 1e-4


def temperature_field(r: Mapping[str, Any]) -> float:
    t = float_field(r, "temperature", 0.0, 0.0)
    if 0.0 < t < MIN_TEMPERATURE:
        raise bad(f"request {r.get('rid')!r}: temperature {t!r} is too small; 0 (greedy) or >= {MIN_TEMPERATURE}")
    return t


def bool_field(r: Mapping[str, Any], key: str, default: bool) -> bool:
    v = r.get(key, default)
    if not isinstance(v, bool):
        raise bad(f"request {r.get('rid')!r}: {key} must be a bool, got {v!r}")
    return v


def int_list(r: Mapping[str, Any], key: str, length: int | None = None) -> list[int] | None:
    v = r.get(key)
    if v is None:
        return None
    if not isinstance(v, list) or not all(is_int(x) for x in v) or (length is not None and len(v) != length):
        want = f" of {length}" if length is not None else ""
        raise bad(f"request {r.get('rid')!r}: {key} must be a list{want} ints, got {v!r}")
    return v


def prob_list(r: Mapping[str, Any], key: str, length: int) -> list[float] | None:
    """An optional list of ``length`` numbers in [0, 1]."""
    v = r.get(key)
    if v is None:
        return None
    if (not isinstance(v, list) or len(v) != length
            or not all((is_int(x) or isinstance(x, float)) and 0.0 <= x <= 1.0 for x in v)):
        raise bad(f"request {r.get('rid')!r}: {key} must be a list of {length} numbers in [0, 1], got {v!r}")
    return [float(x) for x in v]


def arrays(arrs: Mapping[str, np.ndarray], spec: dict[str, tuple[str, int]]) -> dict[str, np.ndarray]:
    """Check that exactly the arrays in ``spec`` = {name: (dtype, length)} came, 1-D."""
    extra = sorted(set(arrs) - set(spec))
    if extra:
        raise bad(f"unexpected array {extra[0]!r}; this op takes {sorted(spec) or 'no arrays'}")
    for name, (dtype, length) in spec.items():
        a = arrs.get(name)
        if a is None:
            raise bad(f"missing array {name!r} ({dtype} [{length}])")
        if a.dtype.name != dtype:
            raise bad(f"array {name!r} must be {dtype}, got {a.dtype.name}")
        if a.shape != (length,):
            raise bad(f"array {name!r} must have shape [{length}] (sum over requests), got {list(a.shape)}")
    return dict(arrs)


def token_range(name: str, a: np.ndarray, vocab: int) -> None:
    if a.size and (int(a.min()) < 0 or int(a.max()) >= vocab):
        bad_i = int(np.nonzero((a < 0) | (a >= vocab))[0][0])
        raise bad(f"array {name!r}[{bad_i}] = {int(a[bad_i])} is not a token id in [0, {vocab})")


def split(a: np.ndarray, sizes: list[int]) -> list[np.ndarray]:
    """Consecutive views of ``a`` with the given lengths (the per-request parts of a batch)."""
    out, off = [], 0
    for n in sizes:
        out.append(a[off:off + n])
        off += n
    return out


# Bounds a draft reply (k rows of V probabilities each); speculation uses far fewer steps.
MAX_DRAFT_STEPS = 256


@dataclass
class DraftRequest:
    """One request of a validated `draft` op (``entry`` is the worker's state for it)."""
    entry: Any
    keep: int | None
    feed: np.ndarray
    k: int
    topk: int
    temperature: float
    return_probs: bool
    seed: int | None
    forced: list[int] | None
    min_reach: list[float] | None = None  # greedy: stop after step j once reach < min_reach[j]


def draft_plans(header: Mapping[str, Any], arrs: Mapping[str, np.ndarray], vocab: int,
                held: Callable[[str], Any], length: Callable[[Any], int]) -> list[DraftRequest]:
    """Parse and check a `draft` op for any worker kind; nothing is changed here."""
    reqs = requests(header, {"keep", "n_feed", "k", "topk", "temperature", "return_probs", "seed", "forced",
                             "min_reach"})
    n_feeds = [int_field(r, "n_feed", 1) for r in reqs]
    a = arrays(arrs, {"feed": ("int32", sum(n_feeds))})
    token_range("feed", a["feed"], vocab)
    plans = []
    for r, feed in zip(reqs, split(a["feed"], n_feeds)):
        e = held(r["rid"])
        keep = int_field(r, "keep", 0, length(e), default=None)
        k = int_field(r, "k", 1, MAX_DRAFT_STEPS)
        forced = int_list(r, "forced", length=k)
        if forced is not None and any(not -1 <= t < vocab for t in forced):
            raise bad(f"request {r['rid']!r}: forced tokens must be -1 or in [0, {vocab}), got {forced}")
        plans.append(DraftRequest(e, keep, feed, k, int_field(r, "topk", 0, vocab, default=0),
                               temperature_field(r), bool_field(r, "return_probs", False),
                               int_field(r, "seed", 0, 2**64 - 1, default=None), forced,
                               prob_list(r, "min_reach", k)))
    return plans
