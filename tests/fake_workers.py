"""Fake workers for in-process tests of the control core (tests/test_control_core.py).

They answer the worker ops of docs/protocol.md the way a real worker does (the cache
convention included: the last committed token is never cached; a draft op feeds all its
chosen tokens but the last), over a toy language model instead of an engine, so a round
of the real control plane runs in microseconds. The real workers and the real processes
are covered by the end-to-end tests (test_control_greedy.py, test_e2e_*.py).

A test scripts failures per op: ``worker.fail("verify", WorkerError("capacity", ...))``
makes the next verify raise it (a soft error); a TimeoutError is a dead worker.
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any, Callable

import numpy as np

from cosine.workers.client import WorkerError

V = 32  # the toy vocabulary


def target_next(ctx: list[int]) -> int:
    """The toy target's greedy next token after ``ctx``."""
    return (5 * ctx[-1] + 3 * (ctx[-2] if len(ctx) > 1 else 0) + 1) % V


def autoregressive(prompt: list[int], n: int) -> list[int]:
    out = list(prompt)
    for _ in range(n):
        out.append(target_next(out))
    return out[len(prompt):]


Proposer = Callable[[list[int]], "tuple[int, float] | None"]  # ctx -> (token, prob), None: nothing


def perfect(ctx: list[int]) -> tuple[int, float]:
    return target_next(ctx), 0.9


def poor(ctx: list[int]) -> tuple[int, float]:
    """Right unless the context's sum is a multiple of 3."""
    t = target_next(ctx)
    return (t if sum(ctx) % 3 else (t + 1) % V), 0.6


def lookup(ctx: list[int]) -> tuple[int, float] | None:
    """Like prompt lookup: a sure proposal, or nothing at all (at every fifth position)."""
    return (target_next(ctx), 0.95) if len(ctx) % 5 else None


class FakeWorker:
    """The ops every worker has; ``calls`` counts them per op."""

    def __init__(self) -> None:
        self.cache: dict[str, list[int]] = {}
        self.calls: dict[str, int] = defaultdict(int)
        self._failures: dict[str, list[BaseException]] = defaultdict(list)

    def fail(self, op: str, error: BaseException, times: int = 1) -> None:
        self._failures[op] += [error] * times

    def call(self, op: str, header_fields: dict[str, Any] | None = None,
             arrays: dict[str, np.ndarray] | None = None,
             timeout_s: float | None = None) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
        self.calls[op] += 1
        if self._failures[op]:
            raise self._failures[op].pop(0)
        return getattr(self, "op_" + op)(header_fields or {}, arrays or {})

    def close(self) -> None:
        pass

    def op_prefill(self, h: dict[str, Any], a: dict[str, np.ndarray]) -> tuple[dict, dict]:
        off = 0
        for r in h["requests"]:
            if r["rid"] in self.cache:
                raise WorkerError("duplicate_request", f"{r['rid']} is already held")
            self.cache[r["rid"]] = [int(t) for t in a["tokens"][off:off + r["n"]]]
            off += r["n"]
        return {"requests": [{"rid": r["rid"], "length": len(self.cache[r["rid"]])} for r in h["requests"]]}, {}

    def op_release(self, h: dict[str, Any], a: dict[str, np.ndarray]) -> tuple[dict, dict]:
        gone = [r for r in h.get("rids", []) if self.cache.pop(r, None) is not None]
        return {"released": gone, "unknown": [r for r in h.get("rids", []) if r not in gone]}, {}

    def op_health(self, h: dict[str, Any], a: dict[str, np.ndarray]) -> tuple[dict, dict]:
        return {"name": "fake"}, {}

    def op_stats(self, h: dict[str, Any], a: dict[str, np.ndarray]) -> tuple[dict, dict]:
        return {"requests_held": len(self.cache), "steps": dict(self.calls)}, {}


class FakeVerifier(FakeWorker):
    """Scores a tree with the toy target: the argmax after every node's path."""

    def __init__(self) -> None:
        super().__init__()
        self.pending: dict[str, list[int]] = {}   # rid -> the last verified tree's tokens

    def op_verify(self, h: dict[str, Any], a: dict[str, np.ndarray]) -> tuple[dict, dict]:
        argmax, off = [], 0
        for r in h["requests"]:
            rid, n = r["rid"], r["n"]
            if rid not in self.cache:
                raise WorkerError("unknown_request", f"{rid} is not held")
            toks = [int(t) for t in a["tokens"][off:off + n]]
            parents = [int(p) for p in a["parents"][off:off + n]]
            if r.get("commit") is not None:  # the previous round's accepted nodes, root first
                self.cache[rid] += [self.pending[rid][u] for u in r["commit"]]
            self.pending[rid] = toks
            for u in range(n):
                path, w = [], u
                while w >= 0:
                    path.append(toks[w])
                    w = parents[w]
                argmax.append(target_next(self.cache[rid] + path[::-1]))
            off += n
        am = np.asarray(argmax, np.int32)
        out = {"argmax": am}
        if h.get("return") == "logits":
            out["logits"] = np.where(np.arange(V)[None, :] == am[:, None], 8.0, 0.0).astype(np.float32)
        return {"requests": [{"rid": r["rid"], "length": len(self.cache[r["rid"]])} for r in h["requests"]]}, out


class FakeDrafter(FakeWorker):
    """Drafts with ``propose``; its distribution puts the rest of the mass evenly elsewhere."""

    def __init__(self, propose: Proposer):
        super().__init__()
        self.propose = propose

    def _dist(self, ctx: list[int]) -> tuple[int, np.ndarray]:
        got = self.propose(ctx)
        if got is None:
            return -1, np.zeros(V)
        tok, p = got
        q = np.full(V, (1.0 - p) / (V - 1))
        q[tok] = p
        return tok, q

    def op_draft(self, h: dict[str, Any], a: dict[str, np.ndarray]) -> tuple[dict, dict]:
        feed, off = [int(t) for t in a["feed"]], 0
        rows: dict[str, list] = defaultdict(list)
        reps = []
        width = max(r.get("topk", 1) for r in h["requests"])
        for r in h["requests"]:
            rid, k = r["rid"], r["k"]
            if rid not in self.cache:
                raise WorkerError("unknown_request", f"{rid} is not held")
            cache = self.cache[rid] if r.get("keep") is None else self.cache[rid][:r["keep"]]
            cache = cache + feed[off:off + r["n_feed"]]
            off += r["n_feed"]
            chosen = self._chain(cache, r)
            self.cache[rid] = cache + [t for t, _ in chosen[:-1] if t >= 0]
            for step in range(k):
                tok, q = chosen[step] if step < len(chosen) else (-1, np.zeros(V))
                top = np.argsort(-q, kind="stable")[:width] if tok >= 0 else np.full(width, -1)
                rows["tokens"].append(tok)
                rows["token_probs"].append(q[tok] if tok >= 0 else 0.0)
                rows["topk_ids"].append(top)
                rows["topk_probs"].append(q[top] if tok >= 0 else np.zeros(width))
                rows["probs"].append(q)
            reps.append({"rid": rid, "length": len(self.cache[rid]), "k": len(chosen)})
        out = {"tokens": np.asarray(rows["tokens"], np.int32), "token_probs": np.asarray(rows["token_probs"], np.float32),
               "topk_ids": np.asarray(rows["topk_ids"], np.int32).reshape(-1, width),
               "topk_probs": np.asarray(rows["topk_probs"], np.float32).reshape(-1, width)}
        if any(r.get("return_probs") for r in h["requests"]):
            out["probs"] = np.asarray(rows["probs"], np.float32)
        return {"requests": reps}, out

    def _chain(self, cache: list[int], r: dict[str, Any]) -> list[tuple[int, np.ndarray]]:
        """The op's steps: (token, distribution); forced tokens ride along, ``min_reach``
        ends a greedy chain early, a weight-free "nothing" ends it for good."""
        chosen: list[tuple[int, np.ndarray]] = []
        forced, stops, reach = r.get("forced"), r.get("min_reach"), 1.0
        for step in range(r["k"]):
            own, q = self._dist(cache + [t for t, _ in chosen])
            tok = forced[step] if forced is not None and forced[step] >= 0 else own
            if tok < 0:
                break
            chosen.append((tok, q))
            if stops is not None and forced is None:
                reach *= float(q[tok])
                if reach < stops[step]:
                    break
        return chosen
