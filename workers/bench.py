"""`cosine-bench worker`: one engine behind a real worker, round trip next to engine time.

    python -m cosine.workers.bench [--engine DIR] [--provider cpu|cuda|tensorrt] [--device cpu|cuda:N]
        [--threads N] [--iters N] [--warmup N] [--prefix N] [--batches 1,4,16]
        [--tree-sizes 1,2,4,8,16,32,64] [--tree-shape chain|binary] [--prefill-lengths 128,512]
        [--tree-nodes 8] [--floor-ms X | --bandwidth-gbs B] [--llamacpp GGUF] [--json FILE|-] [--md FILE]
        [--quick]

Starts one worker process (spawn_worker, a generated config with the given provider,
device and threads) on a free loopback port and times, through WorkerClient (loopback
ZeroMQ, the control plane's transport):

  overhead  a draft step (n_feed=1, k=1, `keep` so the length stays fixed) and a verify of
            a --tree-nodes chain, batch 1, plus the `health` round trip: the per-call
            overhead numbers of docs/workers.md
  prefill   one `prefill` op of L tokens into an empty cache, batch 1 (tokens/s)
  decode    one plain decoding step: a `verify` of a single-node tree per request, which
            is what the control plane sends the target in autoregressive mode (and for a
            request that does not speculate); B requests in one op, each holding --prefix
            cached tokens
  verify    a `verify` of an N-node tree (a chain unless --tree-shape binary), batch 1,
            --prefix cached tokens

The worker is then stopped (so two copies of a large engine are never loaded at once) and
the same forwards are timed in this process, through the worker's own batching code (a
single row padded to a target's two, key slots, the cache slab as the past) over a cache
of the same lengths, on the same provider, device and threads: the engine time.
overhead = rtt p50 - engine p50 (transport, codec, thread hops, validation, cache
bookkeeping). Warm-up calls are excluded;
prefilled requests are released after each measurement. Without --engine a tiny llama
engine is exported first (cosine.export, parity checked on the chosen provider).

With --llamacpp GGUF, llama.cpp (llama-cpp-python, the optional peer of cosine-bench run)
is timed on that file at the batch-1 shapes (prefill, decode, chain verifies with every
token's logits), with the same token ids and cached lengths, each call taking turns with
the engine's call of the same shape, and reported beside the engine: the engine-level
comparison, free of either system's serving loop.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import itertools
import json
import os
import platform
import re
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cosine.config import PROVIDERS

# profile defaults; any option given explicitly wins
FULL = {"iters": 200, "prefix": 32, "batches": "1,4,16", "tree_sizes": "1,2,4,8,16,32,64",
        "prefill_lengths": "128,512", "tree_nodes": 8}
QUICK = {"iters": 10, "prefix": 16, "batches": "1,4", "tree_sizes": "1,8", "prefill_lengths": "32",
         "tree_nodes": 8}
TINY_MAX_POSITIONS = 1024  # the default tiny engine's context: room for --prefill-lengths 512
# Between the engine's and a peer's calls: llama.cpp's threads keep polling for work for a
# while after a call and would take the cores from the engine's next call.
SETTLE_S = float(os.environ.get("COSINE_BENCH_SETTLE_S", "0.05"))


class BenchError(Exception):
    """A bad setting (exit 2) or a failure while measuring (exit 3); one line for the user."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


@dataclass
class Settings:
    provider: str = "cpu"
    device: str = "cpu"
    threads: int = 1
    iters: int = 200
    warmup: int = 10
    prefix: int = 32
    batches: tuple[int, ...] = (1, 4, 16)
    tree_sizes: tuple[int, ...] = (1, 2, 4, 8, 16, 32, 64)
    tree_shape: str = "chain"
    prefill_lengths: tuple[int, ...] = (128, 512)
    tree_nodes: int = 8
    floor_ms: float | None = None
    bandwidth_gbs: float | None = None
    timeout_s: float = 900.0
    health_iters: int = field(default=0)  # 0: max(iters, 100) (health costs no compute)


def default_warmup(iters: int) -> int:
    return min(10, max(1, iters // 5))


# ----- shapes ---------------------------------------------------------------------------

def tree_parents(n: int, shape: str) -> np.ndarray:
    """Parents of an n-node tree: a chain (depth n-1) or a balanced binary tree."""
    if shape == "chain":
        return np.arange(-1, n - 1, dtype=np.int32)
    return np.array([-1] + [(i - 1) // 2 for i in range(1, n)], np.int32)


def _tokens(n: int, start: int, vocab: int) -> np.ndarray:
    return ((np.arange(n) + start) % max(1, vocab - 1) + 1).astype(np.int32)


# ----- the worker side ------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def worker_config(tmp: Path, engine_dir: Path, s: Settings) -> tuple[Path, str]:
    """A one-worker config serving ``engine_dir`` as the target; returns (path, endpoint)."""
    port = _free_port()
    need = max(max(s.batches, default=1) * (s.prefix + 1), max(s.prefill_lengths, default=0),
               s.prefix + max((*s.tree_sizes, s.tree_nodes)) + 1)
    p = tmp / "config.toml"
    p.write_text(f"""[logging]
level = "WARNING"
[limits]
max_tree_nodes = {max(64, *s.tree_sizes, s.tree_nodes)}
[[models]]
name = "bench"
role = "target"
engine = {json.dumps(str(Path(engine_dir).resolve()))}
[[workers]]
name = "bench-0"
model = "bench"
port = {port}
provider = "{s.provider}"
device = "{s.device}"
threads = {s.threads}
max_batch = {max(16, *s.batches)}
kv_budget_tokens = {max(65536, 2 * need)}
[controller]
endpoint = "tcp://127.0.0.1:{_free_port()}"
""")
    return p, f"tcp://127.0.0.1:{port}"


def _timed(fn: Callable[[], Any], iters: int, warmup: int, after: Callable[[], Any] | None = None,
           mark: Callable[[], float] | None = None) -> tuple[list[float], float | None]:
    """ms per call of ``fn`` over ``iters`` calls after ``warmup`` untimed ones. ``after``
    runs (untimed) after every call; ``mark()`` (worker busy seconds) is read around the
    timed calls and gives the mean op time inside the worker."""
    for _ in range(warmup):
        fn()
        if after:
            after()
    b0 = mark() if mark else None
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
        if after:
            after()
    op = (mark() - b0) * 1e3 / iters if mark and b0 is not None else None
    return out, op


def worker_side(engine_dir: Path, s: Settings, vocab: int, progress: Callable[[str], None]) -> dict[str, Any]:
    """Every measurement through one real worker process; raw samples (ms) per key."""
    from .client import WorkerClient, spawn_worker, stop_worker

    out: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        cfg, endpoint = worker_config(Path(tmp), engine_dir, s)
        t0 = time.perf_counter()
        try:
            proc = spawn_worker(cfg, "bench-0", timeout_s=s.timeout_s)
        except RuntimeError as e:
            raise BenchError(f"the worker did not start: {e}", 3) from None
        out["worker_start_s"] = time.perf_counter() - t0
        progress(f"worker up after {out['worker_start_s']:.1f} s")
        try:
            with WorkerClient(endpoint, timeout_s=s.timeout_s) as c:
                def busy() -> float:
                    return float(c.call("stats")[0]["busy_s"])

                def timed(fn: Callable[[], Any], after: Callable[[], Any] | None = None) -> dict[str, Any]:
                    xs, op = _timed(fn, s.iters, s.warmup, after, busy)
                    return {"rtt": xs, "op_ms_mean": op}

                P = s.prefix
                # -- per-call overhead (the original benchmark) --
                c.call("prefill", {"requests": [{"rid": "o", "n": P}]}, {"tokens": _tokens(P, 0, vocab)})
                feed = _tokens(1, P, vocab)
                chain = {"tokens": _tokens(s.tree_nodes, P, vocab), "parents": tree_parents(s.tree_nodes, "chain")}
                ov = {"draft": timed(lambda: c.call(
                    "draft", {"requests": [{"rid": "o", "keep": P, "n_feed": 1, "k": 1}]}, {"feed": feed}))}
                ov["verify"] = timed(lambda: c.call("verify", {"requests": [{"rid": "o", "n": s.tree_nodes}]}, chain))
                lat = c.call("stats")[0]["op_latency_ms"]  # before any other draft/verify
                for op in ("draft", "verify"):
                    ov[op]["op_ms_p50"] = lat[op]["p50"]
                c.call("release", {"rids": ["o"]})
                c.call("health")
                ov["health"] = _timed(lambda: c.call("health"), s.health_iters or max(s.iters, 100), s.warmup)[0]
                out["overhead"] = ov
                progress("overhead done")

                # -- prefill: a fresh request per call, released right after it --
                out["prefill"] = {}
                for L in s.prefill_lengths:
                    counter, rid = itertools.count(), [""]
                    toks = _tokens(L, 0, vocab)

                    def prefill(L: int = L, toks: np.ndarray = toks) -> None:
                        rid[0] = f"p{L}.{next(counter)}"
                        c.call("prefill", {"requests": [{"rid": rid[0], "n": L}]}, {"tokens": toks})

                    out["prefill"][L] = timed(prefill, lambda: c.call("release", {"rids": [rid[0]]}))
                    progress(f"prefill {L} done")

                # -- decode: B requests, one single-node verify each, one op --
                out["decode"] = {}
                for B in s.batches:
                    rids = [f"d{B}.{i}" for i in range(B)]
                    c.call("prefill", {"requests": [{"rid": r, "n": P} for r in rids]},
                           {"tokens": np.tile(_tokens(P, 0, vocab), B)})
                    arrays = {"tokens": np.full(B, _tokens(1, P, vocab)[0], np.int32),
                              "parents": np.full(B, -1, np.int32)}
                    header = {"requests": [{"rid": r, "n": 1} for r in rids]}
                    out["decode"][B] = timed(lambda header=header, arrays=arrays: c.call("verify", header, arrays))
                    c.call("release", {"rids": rids})
                    progress(f"decode batch {B} done")

                # -- verify against tree size: one request; each verify discards the
                # previous (uncommitted) tree, so the cache stays at P tokens --
                out["verify"] = {}
                c.call("prefill", {"requests": [{"rid": "t", "n": P}]}, {"tokens": _tokens(P, 0, vocab)})
                for N in s.tree_sizes:
                    arrays = {"tokens": _tokens(N, P, vocab), "parents": tree_parents(N, s.tree_shape)}
                    header = {"requests": [{"rid": "t", "n": N}]}
                    out["verify"][N] = timed(lambda header=header, arrays=arrays: c.call("verify", header, arrays))
                    progress(f"verify {N} nodes done")
                c.call("release", {"rids": ["t"]})
                st = c.call("stats")[0]
                out["worker_stats"] = {"requests_held": st["requests_held"], "cache_tokens_used": st["cache_tokens_used"],
                                       "cache_tokens_budget": st["cache_tokens_budget"], "steps": st["steps"],
                                       "errors": st.get("errors", {})}
        except Exception as e:  # WorkerError / TimeoutError: name it, in one line
            if isinstance(e, BenchError):
                raise
            raise BenchError(f"worker call failed: {type(e).__name__}: {e}", 3) from e
        finally:
            rc = stop_worker(proc)
            if rc not in (0, None):
                progress(f"worker exited with code {rc}")
    return out


# ----- the engine side ------------------------------------------------------------------

Shape = tuple[str, int]  # ("prefill", tokens) | ("decode", batch) | ("verify", nodes) | ("draft"|"chain", 0)


def engine_side(engine_dir: Path, s: Settings, progress: Callable[[str], None],
                peer: dict[Shape, Callable[[], Any]] | None = None) -> dict[str, Any]:
    """The worker's forwards in this process, without the worker: the same batching code
    (workers/batching.py: a single row padded to the target's two, key slots, the whole
    cache slab as the past) over a cache of the same lengths, on the same provider, device
    and threads, so that rtt - engine is the transport and the op's bookkeeping alone.
    ``peer``: another system's call per shape (llamacpp_shapes), timed call for call in
    turn with the engine's, so that both see the same moments of a noisy host."""
    from .batching import Feed, chain, run_batched
    from .engine import Engine, EngineError
    from .kvcache import Entry, KVCache
    from cosine.tree import depths

    t0 = time.perf_counter()
    try:  # the bench worker serves the engine as a target (worker_config): two rows at least
        engine = Engine(engine_dir, s.provider, s.device, s.threads, min_rows=2)
    except EngineError as e:
        raise BenchError(str(e), 3) from None
    load_s = time.perf_counter() - t0
    progress(f"engine loaded in this process after {load_s:.1f} s")
    cache = KVCache(engine.num_layers, engine.num_kv_heads, engine.head_dim, engine.dtype,
                    budget_tokens=1 << 30, max_tokens=engine.max_positions, arrays=engine.arrays)
    P, L = s.prefix, engine.num_layers
    names = itertools.count()

    def held(B: int) -> list[Entry]:
        """B requests holding P cached tokens each (zeros: the values do not change the time)."""
        out = []
        for _ in range(B):
            e = cache.create(f"e{next(names)}", reserve=P)
            rows = engine.arrays.zeros((engine.num_kv_heads, P, engine.head_dim), engine.dtype)
            cache.append(e, [rows] * L, [rows] * L)
            out.append(e)
        return out

    def tree(parents: np.ndarray, B: int = 1) -> Callable[[], Any]:
        entries = held(B)
        toks = _tokens(parents.size, P, engine.vocab_size)
        feeds = [Feed(e, toks, depths(parents) + e.length, parents) for e in entries]
        return lambda: run_batched(engine, feeds, max(16, B))

    def prefill(n: int) -> Callable[[], Any]:
        toks = _tokens(n, 0, engine.vocab_size)

        def run() -> None:  # as the prefill op: a fresh request, the last token's logits only
            e = cache.create(f"e{next(names)}", reserve=n)
            try:
                run_batched(engine, [chain(e, toks, 1)], 16)
            finally:
                cache.release(e.rid)
        return run

    peer_ms: dict[Shape, list[float]] = {}

    def timed(shape: Shape, fn: Callable[[], Any]) -> list[float]:
        other = (peer or {}).get(shape)
        try:
            if other is None:
                return _timed(fn, s.iters, s.warmup)[0]
            ours, theirs = [], []
            for i in range(s.warmup + s.iters):  # in turn, the order swapped every call
                turns = ((ours, fn), (theirs, other)) if i % 2 == 0 else ((theirs, other), (ours, fn))
                for samples, f in turns:
                    time.sleep(SETTLE_S)
                    t = time.perf_counter()
                    f()
                    if i >= s.warmup:
                        samples.append((time.perf_counter() - t) * 1e3)
            peer_ms[shape] = theirs
            return ours
        finally:  # as the worker side releases its requests after each measurement
            for rid in list(cache.entries):
                cache.release(rid)

    single = np.array([-1], np.int32)
    out: dict[str, Any] = {"load_s": load_s,
                           "overhead": {"draft": timed(("draft", 0), tree(single)),
                                        "verify": timed(("chain", 0), tree(tree_parents(s.tree_nodes, "chain")))}}
    progress("engine: overhead shapes done")
    out["prefill"] = {n: timed(("prefill", n), prefill(n)) for n in s.prefill_lengths}
    progress("engine: prefill done")
    out["decode"] = {B: timed(("decode", B), tree(single, B)) for B in s.batches}
    progress("engine: decode done")
    out["verify"] = {N: timed(("verify", N), tree(tree_parents(N, s.tree_shape))) for N in s.tree_sizes}
    progress("engine: verify done")
    out["peer"] = peer_ms
    return out


def llamacpp_shapes(gguf: Path, s: Settings, vocab: int) -> dict[Shape, Callable[[], Any]]:
    """llama.cpp (llama-cpp-python) on a GGUF file at the batch-1 shapes: prefill of L tokens
    into an empty cache (the last token's logits), one token after --prefix cached ones
    (decode), and a chain of N tokens after them with every token's logits, which a tree
    verify needs (logits_all). One instance per kind of shape (the weights are mapped once),
    so that no call has to restore another's cache. Same token ids as the engine's."""
    try:
        from llama_cpp import Llama
    except ImportError:
        from cosine.bench.llamacpp import BUILD_HINT

        raise BenchError(f"--llamacpp needs llama-cpp-python: {BUILD_HINT}") from None
    P, threads = s.prefix, s.threads or os.cpu_count() or 1
    n_ctx = max(max(s.prefill_lengths), P + max(*s.tree_sizes, s.tree_nodes) + 1)
    prefiller, last, every = (Llama(model_path=str(gguf), n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
                                    n_batch=max(512, n_ctx), logits_all=logits_all, verbose=False)
                              for logits_all in (False, False, True))
    for llm in (last, every):
        llm.eval([int(t) for t in _tokens(P, 0, vocab)])  # the cached prefix, once

    def after_prefix(llm: Any, toks: list[int]) -> Callable[[], Any]:
        def run() -> None:
            llm.n_tokens = P  # eval() drops the cache rows past n_tokens: back to the prefix
            llm.eval(toks)
        return run

    def prefill(toks: list[int]) -> Callable[[], Any]:
        def run() -> None:
            prefiller.reset()
            prefiller.eval(toks)
        return run

    shapes: dict[Shape, Callable[[], Any]] = {
        ("prefill", n): prefill([int(x) for x in _tokens(n, 0, vocab)]) for n in s.prefill_lengths}
    shapes[("decode", 1)] = after_prefix(last, [int(_tokens(1, P, vocab)[0])])
    shapes.update({("verify", n): after_prefix(every, [int(x) for x in _tokens(n, P, vocab)]) for n in s.tree_sizes})
    return shapes


# ----- results --------------------------------------------------------------------------

def _pct(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs, float), q))


def _row(w: dict[str, Any], eng: list[float]) -> dict[str, Any]:
    r = {"rtt_ms_p50": _pct(w["rtt"], 50), "rtt_ms_p95": _pct(w["rtt"], 95),
         "engine_ms_p50": _pct(eng, 50), "engine_ms_p95": _pct(eng, 95), "op_ms_mean": w.get("op_ms_mean")}
    r["overhead_ms_p50"] = r["rtt_ms_p50"] - r["engine_ms_p50"]
    return r


def weight_bytes(engine_dir: Path) -> int:
    """Bytes of the graph and its external weights (model.onnx, model.onnx.data)."""
    return sum(p.stat().st_size for p in Path(engine_dir).iterdir() if p.name.startswith("model.onnx") and p.is_file())


def _git_commit() -> str:
    """HEAD of the checkout this code runs from, read from .git without running git."""
    try:
        here = Path(__file__).resolve().parent
        for d in (here, *here.parents):
            g = d / ".git"
            if g.is_file() and g.read_text().startswith("gitdir:"):
                g = (d / g.read_text()[7:].strip()).resolve()
            if g.is_dir():
                break
        else:
            return ""
        head = (g / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head
        ref = head[4:].strip()
        common = g
        if (g / "commondir").is_file():
            common = (g / (g / "commondir").read_text().strip()).resolve()
        for base in (g, common):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()
        packed = common / "packed-refs"
        if packed.is_file():
            for line in packed.read_text().splitlines():
                if line.endswith(" " + ref):
                    return line.split()[0]
    except OSError:
        pass
    return ""


def _weights(man: dict[str, Any]) -> str:
    """What the engine's weights are: its dtype, or the quantization and the activations."""
    q = (man.get("quantization") or {}).get("mode")
    return f"{q} weights, {man.get('activations', 'float')} activations" if q else str(man.get("dtype"))


def environment(engine_dir: Path, s: Settings, argv: list[str], tiny: bool) -> dict[str, Any]:
    import onnxruntime as ort

    man = json.loads((Path(engine_dir) / "manifest.json").read_text())
    return {
        "engine": {"dir": "(tiny llama engine exported for this run)" if tiny else str(engine_dir),
                   "name": man.get("name"), "dtype": man.get("dtype"), "architecture": man.get("architecture"),
                   "weights": _weights(man),
                   "num_layers": man.get("num_layers"), "hidden_size": man.get("hidden_size"),
                   "vocab_size": man.get("vocab_size"), "weight_bytes": weight_bytes(engine_dir)},
        "provider": s.provider, "device": s.device, "threads": s.threads,
        "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
        "host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
        "python": platform.python_version(), "git_commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "command": "cosine-bench worker " + " ".join(argv),
    }


def assemble(env: dict[str, Any], s: Settings, w: dict[str, Any], e: dict[str, Any],
             llama: dict[str, Any] | None = None) -> dict[str, Any]:
    ov = {"tree_nodes": s.tree_nodes, "health_rtt_ms_p50": _pct(w["overhead"]["health"], 50),
          "health_rtt_ms_p95": _pct(w["overhead"]["health"], 95)}
    for op in ("draft", "verify"):
        ov[op] = {**_row(w["overhead"][op], e["overhead"][op]), "op_ms_p50": w["overhead"][op]["op_ms_p50"]}
    prefill = {}
    for L in s.prefill_lengths:
        r = _row(w["prefill"][L], e["prefill"][L])
        r.update(tokens=L, rtt_tokens_per_s=L * 1e3 / r["rtt_ms_p50"], engine_tokens_per_s=L * 1e3 / r["engine_ms_p50"])
        prefill[str(L)] = r
    decode = {}
    for B in s.batches:
        r = _row(w["decode"][B], e["decode"][B])
        r.update(batch=B, rtt_tokens_per_s=B * 1e3 / r["rtt_ms_p50"], engine_tokens_per_s=B * 1e3 / r["engine_ms_p50"])
        decode[str(B)] = r
    verify = {}
    for N in s.tree_sizes:
        r = _row(w["verify"][N], e["verify"][N])
        r.update(nodes=N, depth=int(tree_depth(N, s.tree_shape)))
        verify[str(N)] = r
    floor = None
    if s.floor_ms is not None or s.bandwidth_gbs is not None:
        wb = env["engine"]["weight_bytes"]
        f_ms = s.floor_ms if s.floor_ms is not None else wb / (s.bandwidth_gbs * 1e9) * 1e3
        floor = {"floor_ms": f_ms, "weight_bytes": wb, "bandwidth_gbs": s.bandwidth_gbs,
                 "source": "--floor-ms" if s.floor_ms is not None else "weight bytes / --bandwidth-gbs"}
        if "1" in decode:
            floor["decode_rtt_ratio"] = decode["1"]["rtt_ms_p50"] / f_ms
            floor["decode_engine_ratio"] = decode["1"]["engine_ms_p50"] / f_ms
    settings = asdict(s)
    settings.pop("timeout_s")
    return {"environment": env, "settings": settings,
            "timing": {"worker_start_s": w["worker_start_s"], "engine_load_s": e["load_s"]},
            "overhead": ov, "prefill": prefill, "decode": decode, "verify": verify, "floor": floor,
            "worker_stats": w["worker_stats"], "llamacpp": against_llamacpp(e, llama) if llama else None}


def against_llamacpp(e: dict[str, Any], llama: dict[str, Any]) -> dict[str, Any]:
    """Engine p50 beside llama.cpp's p50 per batch-1 shape; speed = llama.cpp ms / engine ms
    (above 1: the engine is faster)."""
    names = {"prefill": "prefill {} tokens", "decode": "decode (batch {})", "verify": "verify {}-token chain"}

    def pair(kind: str, n: int, peer: list[float]) -> dict[str, Any]:
        a, b = _pct(e[kind][n], 50), _pct(peer, 50)
        return {"shape": names[kind].format(n), "kind": kind, "n": n, "engine_ms_p50": a, "llamacpp_ms_p50": b,
                "engine_speed": b / a}

    rows = [pair(kind, n, ms) for (kind, n), ms in e["peer"].items()]
    return {"gguf": llama["gguf"], "same_source": llama["same_source"], "threads": llama["threads"], "rows": rows}


def tree_depth(n: int, shape: str) -> int:
    return int(n - 1 if shape == "chain" else max(0, n).bit_length() - 1)


# ----- output ---------------------------------------------------------------------------

def _bytes(n: int) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _f(x: float | None, w: int = 9, prec: int = 3) -> str:
    return f"{'-':>{w}}" if x is None else f"{x:{w}.{prec}f}"


def _headline(res: dict[str, Any]) -> list[str]:
    env, s = res["environment"], res["settings"]
    eng = env["engine"]
    return [f"engine {eng['name']} ({eng.get('weights', eng['dtype'])}, {eng['num_layers']} layers, "
            f"{_bytes(eng['weight_bytes'])} of weights) at {eng['dir']}",
            f"provider {env['provider']} on {env['device']}, threads {env['threads']}; onnxruntime "
            f"{env['onnxruntime']}; host {env['host']} ({env['cpu_count']} CPUs); commit {env['git_commit'][:12] or '?'}",
            f"iters {s['iters']} (+{s['warmup']} warm-up, excluded), {s['prefix']} cached tokens per request"]


def text_report(res: dict[str, Any]) -> str:
    s, ov = res["settings"], res["overhead"]
    L = _headline(res)
    L += ["", f"per-call overhead (batch 1): health round trip p50 {ov['health_rtt_ms_p50']:.3f} ms",
          f"{'op':10} {'rtt p50':>9} {'op p50':>9} {'engine p50':>11} {'overhead':>9}   (ms)"]
    for op in ("draft", "verify"):
        r = ov[op]
        label = op if op == "draft" else f"verify{ov['tree_nodes']}"
        L.append(f"{label:10} {_f(r['rtt_ms_p50'])} {_f(r['op_ms_p50'])} {_f(r['engine_ms_p50'], 11)} "
                 f"{_f(r['overhead_ms_p50'])}")
    head = f"{'rtt p50':>9} {'rtt p95':>9} {'eng p50':>9} {'eng p95':>9} {'op mean':>9} {'overhead':>9}"

    def cells(r: dict[str, Any]) -> str:
        return " ".join(_f(r[k]) for k in ("rtt_ms_p50", "rtt_ms_p95", "engine_ms_p50", "engine_ms_p95",
                                           "op_ms_mean", "overhead_ms_p50"))

    L += ["", "prefill (batch 1, empty cache)", f"{'tokens':>7} {head} {'rtt tok/s':>10} {'eng tok/s':>10}   (ms)"]
    for k, r in res["prefill"].items():
        L.append(f"{k:>7} {cells(r)} {r['rtt_tokens_per_s']:10.1f} {r['engine_tokens_per_s']:10.1f}")
    L += ["", f"decode step (verify of a 1-node tree per request, {s['prefix']} cached tokens each)",
          f"{'batch':>7} {head} {'rtt tok/s':>10} {'eng tok/s':>10}   (ms)"]
    for k, r in res["decode"].items():
        L.append(f"{k:>7} {cells(r)} {r['rtt_tokens_per_s']:10.1f} {r['engine_tokens_per_s']:10.1f}")
    L += ["", f"verify vs tree size ({s['tree_shape']}, batch 1, {s['prefix']} cached tokens)",
          f"{'nodes':>7} {head} {'x 1 node':>9}   (ms)"]
    base = res["verify"].get("1", {}).get("engine_ms_p50")
    for k, r in res["verify"].items():
        L.append(f"{k:>7} {cells(r)} {_f(r['engine_ms_p50'] / base if base else None, 9, 2)}")
    fl = res["floor"]
    if fl:
        L += ["", f"memory-bandwidth floor {fl['floor_ms']:.3f} ms ({fl['source']}; weights {_bytes(fl['weight_bytes'])})"]
        if "decode_rtt_ratio" in fl:
            L.append(f"batch-1 decode / floor: rtt {fl['decode_rtt_ratio']:.2f}x, engine {fl['decode_engine_ratio']:.2f}x")
        else:
            L.append("batch-1 decode not measured (add 1 to --batches) - no ratio")
    lc = res.get("llamacpp")
    if lc:
        L += ["", f"against llama.cpp ({lc['gguf']}, {lc['threads']} threads; "
                  f"{'the engine' if lc['same_source'] else 'NOT the engine'}'s source file)",
              f"{'shape':24} {'engine p50':>11} {'llama.cpp p50':>14} {'engine speed':>13}   (ms)"]
        L += [f"{r['shape']:24} {_f(r['engine_ms_p50'], 11)} {_f(r['llamacpp_ms_p50'], 14)} "
              f"{r['engine_speed']:12.2f}x" for r in lc["rows"]]
    t = res["timing"]
    L += ["", f"worker start {t['worker_start_s']:.1f} s, engine load in-process {t['engine_load_s']:.1f} s"]
    return "\n".join(L)


def markdown_report(res: dict[str, Any]) -> str:
    s, ov, env = res["settings"], res["overhead"], res["environment"]
    eng = env["engine"]
    L = [f"# Worker benchmark: {eng['name']} ({eng.get('weights', eng['dtype'])}) on {env['provider']} "
         f"({env['device']})", "",
         f"`{env['command']}`", "",
         f"{env['date']}, host {env['host']} ({env['cpu_count']} CPUs, {env['platform']}), onnxruntime "
         f"{env['onnxruntime']}, threads {env['threads']}, commit `{env['git_commit'][:12] or '?'}`. "
         f"Engine {eng['num_layers']} layers, {_bytes(eng['weight_bytes'])} of weights. "
         f"{s['iters']} timed calls per row after {s['warmup']} warm-up; {s['prefix']} cached tokens per request. "
         "rtt = loopback round trip through a real worker; engine = the same forwards in-process (the worker's batching, no transport), same "
         "provider; op = worker-side op time (mean); overhead = rtt p50 - engine p50. Times in ms.", "",
         "## Per-call overhead (batch 1)", "",
         f"Health round trip p50 {ov['health_rtt_ms_p50']:.3f} ms.", "",
         "| op | rtt p50 | op p50 | engine p50 | overhead |", "|---|---|---|---|---|"]
    for op in ("draft", "verify"):
        r = ov[op]
        label = "draft (n_feed=1, k=1)" if op == "draft" else f"verify, {ov['tree_nodes']}-node chain"
        L.append(f"| {label} | {r['rtt_ms_p50']:.3f} | {r['op_ms_p50']:.3f} | {r['engine_ms_p50']:.3f} | "
                 f"{r['overhead_ms_p50']:.3f} |")

    def row(first: str, r: dict[str, Any], extra: list[str]) -> str:
        op = "-" if r["op_ms_mean"] is None else f"{r['op_ms_mean']:.3f}"
        return (f"| {first} | {r['rtt_ms_p50']:.3f} | {r['rtt_ms_p95']:.3f} | {r['engine_ms_p50']:.3f} | "
                f"{r['engine_ms_p95']:.3f} | {op} | {r['overhead_ms_p50']:.3f} | " + " | ".join(extra) + " |")

    cols = "rtt p50 | rtt p95 | engine p50 | engine p95 | op mean | overhead"
    L += ["", "## Prefill (batch 1, empty cache)", "", f"| tokens | {cols} | rtt tok/s | engine tok/s |",
          "|---" * 9 + "|"]
    L += [row(k, r, [f"{r['rtt_tokens_per_s']:.1f}", f"{r['engine_tokens_per_s']:.1f}"])
          for k, r in res["prefill"].items()]
    L += ["", f"## Decode step (verify of a 1-node tree per request, {s['prefix']} cached tokens each)", "",
          f"| batch | {cols} | rtt tok/s | engine tok/s |", "|---" * 9 + "|"]
    L += [row(k, r, [f"{r['rtt_tokens_per_s']:.1f}", f"{r['engine_tokens_per_s']:.1f}"])
          for k, r in res["decode"].items()]
    L += ["", f"## Verify against tree size ({s['tree_shape']}, batch 1, {s['prefix']} cached tokens)", "",
          f"| nodes | {cols} | engine x 1-node |", "|---" * 8 + "|"]
    base = res["verify"].get("1", {}).get("engine_ms_p50")
    L += [row(k, r, [f"{r['engine_ms_p50'] / base:.2f}" if base else "-"]) for k, r in res["verify"].items()]
    fl = res["floor"]
    if fl:
        line = f"Floor {fl['floor_ms']:.3f} ms ({fl['source']}; weights {_bytes(fl['weight_bytes'])})."
        if "decode_rtt_ratio" in fl:
            line += (f" Batch-1 decode / floor: rtt {fl['decode_rtt_ratio']:.2f}x, "
                     f"engine {fl['decode_engine_ratio']:.2f}x.")
        L += ["", "## Memory-bandwidth floor", "", line]
    lc = res.get("llamacpp")
    if lc:
        L += ["", "## Against llama.cpp (batch 1, in this process, call for call in turn with the engine)", "",
              f"llama-cpp-python on `{lc['gguf']}` ({'the engine' if lc['same_source'] else '**not** the engine'}'s "
              f"source file), {lc['threads']} threads, the same token ids and cached lengths, each call taking turns "
              "with the engine's (the order swapped every call); its verify rows compute "
              "every token's logits (`logits_all`), as a tree verify needs. Engine speed = llama.cpp p50 / engine "
              "p50 (above 1: the engine is faster).", "",
              "| shape | engine p50 | llama.cpp p50 | engine speed |", "|---|---|---|---|"]
        L += [f"| {r['shape']} | {r['engine_ms_p50']:.3f} | {r['llamacpp_ms_p50']:.3f} | {r['engine_speed']:.2f}x |"
              for r in lc["rows"]]
    return "\n".join(L) + "\n"


def plot_against_llamacpp(res: dict[str, Any], path: Path) -> Path | None:
    """Forward time against new tokens (decode and chain verifies) for the engine and llama.cpp."""
    lc = res.get("llamacpp")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    if not lc:
        return None
    pts = [(r["n"], r) for r in lc["rows"] if r["kind"] == "verify"]
    if not pts:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for key, label in (("engine_ms_p50", "cosine engine (worker batching)"), ("llamacpp_ms_p50", "llama.cpp")):
        ax.plot([n for n, _ in pts], [r[key] for _, r in pts], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("tokens in the forward (a chain after the cached prefix; logits for each)")
    ax.set_ylabel("ms per forward (p50)")
    ax.set_title(f"{res['environment']['engine']['name']}: one forward, batch 1, {res['settings']['prefix']} cached")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ----- command line ---------------------------------------------------------------------

def _ints(name: str, text: str, lo: int) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise BenchError(f"--{name} must be a comma-separated list of integers, got {text!r}") from None
    if not vals or min(vals) < lo:
        raise BenchError(f"--{name} needs integers >= {lo}, got {text!r}")
    return tuple(dict.fromkeys(vals))  # order kept, duplicates dropped


def settings_from_args(args: argparse.Namespace) -> Settings:
    prof = QUICK if args.quick else FULL

    def pick(name: str) -> Any:
        v = getattr(args, name)
        return prof[name] if v is None else v

    if args.provider not in PROVIDERS:
        raise BenchError(f"unknown provider {args.provider!r}; use one of {', '.join(PROVIDERS)}")
    device = args.device or ("cpu" if args.provider == "cpu" else "cuda:0")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", device):
        raise BenchError(f"--device must be 'cpu' or 'cuda:N', got {device!r}")
    if (args.provider == "cpu") != (device == "cpu"):
        raise BenchError(f"provider {args.provider!r} does not go with device {device!r}: "
                         "cpu goes with cpu, cuda/tensorrt with cuda:N")
    iters = pick("iters")
    if iters < 1:
        raise BenchError(f"--iters must be >= 1, got {iters}")
    warmup = default_warmup(iters) if args.warmup is None else args.warmup
    if warmup < 0 or args.threads < 0 or pick("prefix") < 0:
        raise BenchError("--warmup, --threads and --prefix must be >= 0")
    tree_nodes = pick("tree_nodes")
    if tree_nodes < 1:
        raise BenchError(f"--tree-nodes must be >= 1, got {tree_nodes}")
    for name in ("floor_ms", "bandwidth_gbs"):
        v = getattr(args, name)
        if v is not None and not v > 0:
            raise BenchError(f"--{name.replace('_', '-')} must be > 0, got {v}")
    return Settings(provider=args.provider, device=device, threads=args.threads, iters=iters, warmup=warmup,
                    prefix=pick("prefix"), batches=_ints("batches", pick("batches"), 1),
                    tree_sizes=_ints("tree-sizes", pick("tree_sizes"), 1), tree_shape=args.tree_shape,
                    prefill_lengths=_ints("prefill-lengths", pick("prefill_lengths"), 1), tree_nodes=tree_nodes,
                    floor_ms=args.floor_ms, bandwidth_gbs=args.bandwidth_gbs)


def check_provider(provider: str) -> None:
    import onnxruntime as ort

    from .engine import _PROVIDER_NAMES

    avail = ort.get_available_providers()
    if _PROVIDER_NAMES[provider] not in avail:
        raise BenchError(f"provider {provider!r} ({_PROVIDER_NAMES[provider]}) is not available in this onnxruntime "
                         f"{ort.__version__} build (available: {', '.join(avail)}); install onnxruntime-gpu "
                         f"for cuda/tensorrt or use --provider cpu")


def check_engine(engine_dir: Path, s: Settings) -> None:
    """Fail before starting anything if the shapes cannot fit the engine."""
    man_path = engine_dir / "manifest.json"
    if not man_path.is_file() or not (engine_dir / "model.onnx").is_file():
        raise BenchError(f"{engine_dir} is not an engine directory (needs manifest.json and model.onnx; "
                         "build one with cosine-export)")
    try:
        ctx = int(json.loads(man_path.read_text())["max_positions"])
    except (ValueError, KeyError, TypeError) as e:
        raise BenchError(f"{man_path}: unreadable manifest ({e})") from None
    longest = max(max(s.prefill_lengths), s.prefix + 1 + tree_depth(max(*s.tree_sizes, s.tree_nodes), s.tree_shape))
    if longest > ctx:
        raise BenchError(f"the longest sequence asked for ({longest} tokens: --prefill-lengths, or --prefix plus "
                         f"the deepest tree) exceeds the engine's context of {ctx}")


def check_gguf(gguf: Path, engine_dir: Path, s: Settings) -> tuple[Path, bool]:
    """Fail early on a missing file or shapes llama.cpp is not timed at; returns (path,
    whether it is the file the engine was exported from, by the manifest's sha256)."""
    if not gguf.is_file():
        raise BenchError(f"--llamacpp {gguf}: no such file (a GGUF model; `cosine models list` shows the fetched ones)")
    if s.tree_shape != "chain":
        raise BenchError("--llamacpp compares chains (llama.cpp has no tree attention): use --tree-shape chain")
    from cosine.bench.llamacpp import available

    why = available()
    if why:
        raise BenchError(why)
    want = json.loads((engine_dir / "manifest.json").read_text()).get("source_sha256")
    h = hashlib.sha256()
    with open(gguf, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return gguf, h.hexdigest() == want


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="cosine-bench worker", description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="Profiles (explicit options win): default " + json.dumps(FULL)
                                 + "; --quick " + json.dumps(QUICK) + ". Warm-up default: min(10, max(1, iters // 5)).")
    ap.add_argument("--engine", type=Path, help="engine directory (default: export a tiny llama engine)")
    ap.add_argument("--provider", default="cpu", help="cpu | cuda | tensorrt (worker and in-process engine)")
    ap.add_argument("--device", default=None, help="cpu | cuda:N (default: cpu for --provider cpu, else cuda:0)")
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (0 = its default)")
    ap.add_argument("--iters", type=int, help="timed calls per measurement")
    ap.add_argument("--warmup", type=int, help="untimed calls before each measurement")
    ap.add_argument("--prefix", type=int, help="cached tokens per request for decode/verify/overhead")
    ap.add_argument("--batches", help="decode batch sizes, e.g. 1,4,16")
    ap.add_argument("--tree-sizes", dest="tree_sizes", help="verify tree sizes in nodes, e.g. 1,2,4,8,16,32,64")
    ap.add_argument("--tree-shape", dest="tree_shape", default="chain", choices=("chain", "binary"),
                    help="shape of the verify trees (default chain: depth = nodes - 1)")
    ap.add_argument("--prefill-lengths", dest="prefill_lengths", help="prefill lengths in tokens, e.g. 128,512")
    ap.add_argument("--tree-nodes", dest="tree_nodes", type=int, help="chain length of the overhead section's verify")
    fl = ap.add_mutually_exclusive_group()
    fl.add_argument("--floor-ms", dest="floor_ms", type=float,
                    help="memory-bandwidth floor of one decode step in ms (weight bytes / bandwidth)")
    fl.add_argument("--bandwidth-gbs", dest="bandwidth_gbs", type=float,
                    help="memory bandwidth in GB/s: floor = the engine's weight bytes / this")
    ap.add_argument("--llamacpp", type=Path, metavar="GGUF",
                    help="also time llama.cpp (llama-cpp-python) on this GGUF file at the batch-1 shapes")
    ap.add_argument("--json", help="write the results as JSON to this file ('-': print JSON only)")
    ap.add_argument("--md", type=Path, help="write a markdown report to this file")
    ap.add_argument("--quick", action="store_true", help="small profile (see below) for smoke tests")
    ap.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    progress = (lambda msg: None) if args.quiet else \
        (lambda msg: print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True))
    try:
        s = settings_from_args(args)
        check_provider(s.provider)
        with tempfile.TemporaryDirectory() as tmp:
            engine_dir, tiny = args.engine, args.engine is None
            if engine_dir is None:
                from cosine.export.build import export_engine
                from cosine.export.tiny import make_tiny_model

                engine_dir = Path(tmp) / "engine"
                man = export_engine(make_tiny_model(Path(tmp) / "hf", arch="llama", seed=0,
                                                    max_positions=TINY_MAX_POSITIONS),
                                    engine_dir, dtype="float32", provider=s.provider, name="tiny-llama",
                                    progress=False)
                progress(f"tiny llama engine exported; parity on {s.provider}: passed={man['parity']['passed']} "
                         f"max_abs_logprob_diff={man['parity'].get('max_abs_logprob_diff')}")
            engine_dir = Path(engine_dir)
            check_engine(engine_dir, s)
            env = environment(engine_dir, s, argv, tiny)
            vocab = int(env["engine"]["vocab_size"])
            gguf = check_gguf(args.llamacpp, engine_dir, s) if args.llamacpp else None
            w = worker_side(engine_dir, s, vocab, progress)
            peer = llamacpp_shapes(gguf[0], s, vocab) if gguf else None
            if peer:
                progress("llama.cpp loaded; its calls take turns with the engine's")
            e = engine_side(engine_dir, s, progress, peer)
            llama = {"gguf": str(gguf[0]), "same_source": gguf[1], "threads": s.threads or os.cpu_count()} \
                if gguf else None
        res = assemble(env, s, w, e, llama)
    except BenchError as err:
        print(f"cosine-bench worker: error: {err}", file=sys.stderr)
        return err.code
    if args.json == "-":
        print(json.dumps(res, indent=2))
    else:
        print(text_report(res))
        if args.json:
            p = Path(args.json)
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_text(json.dumps(res, indent=2) + "\n")
    if args.md:
        args.md.parent.mkdir(parents=True, exist_ok=True)
        args.md.write_text(markdown_report(res))
        plot_against_llamacpp(res, args.md.with_suffix(".png"))  # beside the report, when llama.cpp was timed
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
