"""Per-call worker overhead: loopback round trip minus engine time.

    python -m cosine.workers.bench [--engine DIR] [--iters 200] [--prefix 32] [--tree-nodes 8]

Starts a real worker process on a free loopback port and times, for a draft step
(n_feed=1, k=1) and a verify of a chain tree, three things:
  rtt     client send -> reply decoded (WorkerClient.call)
  op      time inside the worker's op handler (worker stats, p50)
  engine  Engine.forward with the same shapes, in this process
overhead = rtt - engine (transport + codec + validation + cache bookkeeping).
Without --engine a tiny llama engine is built with cosine.export.
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .client import WorkerClient, spawn_worker, stop_worker
from .engine import Engine


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp: Path, engine_dir: Path, threads: int) -> tuple[Path, str]:
    port = _free_port()
    p = tmp / "config.toml"
    p.write_text(f"""[logging]
level = "WARNING"
[[models]]
name = "bench"
role = "target"
engine = "{engine_dir}"
[[workers]]
name = "bench-0"
model = "bench"
port = {port}
threads = {threads}
[controller]
endpoint = "tcp://127.0.0.1:{_free_port()}"
""")
    return p, f"tcp://127.0.0.1:{port}"


def _timed(fn: Callable[[], Any], iters: int) -> list[float]:
    for _ in range(min(10, iters)):  # warm-up
        fn()
    out = []
    for _ in range(iters):
        t = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t) * 1e3)
    return out


def _engine_ms(engine: Engine, prefix: int, parents: np.ndarray, iters: int) -> list[float]:
    """Engine.forward alone with the op's shapes (batch 1, past = prefix rows)."""
    from cosine.tree import ancestor_mask, depths

    n = parents.size
    past = [(np.zeros((1, prefix, engine.num_kv_heads, engine.head_dim), engine.dtype),) * 2
            for _ in range(engine.num_layers)]
    ids = np.ones((1, n), np.int64)
    pos = (depths(parents) + prefix)[None]
    mask = np.concatenate([np.ones((n, prefix), bool), ancestor_mask(parents)], 1)[None, None]
    return _timed(lambda: engine.forward(ids, pos, mask, past), iters)


def measure(engine_dir: Path, iters: int = 200, prefix: int = 32, tree_nodes: int = 8,
            threads: int = 1) -> dict[str, Any]:
    engine = Engine(engine_dir, threads=threads)
    tokens = np.arange(prefix + 1, dtype=np.int32) % engine.vocab_size
    with tempfile.TemporaryDirectory() as tmp:
        cfg, endpoint = _config(Path(tmp), engine_dir, threads)
        proc = spawn_worker(cfg, "bench-0")
        try:
            with WorkerClient(endpoint, timeout_s=30) as c:
                c.call("prefill", {"requests": [{"rid": "b", "n": prefix}]}, {"tokens": tokens[:prefix]})
                feed = tokens[prefix:prefix + 1]
                draft = lambda: c.call("draft", {"requests": [{"rid": "b", "keep": prefix, "n_feed": 1, "k": 1}]},  # noqa: E731
                                       {"feed": feed})
                tree = {"tokens": np.ones(tree_nodes, np.int32),
                        "parents": np.arange(-1, tree_nodes - 1, dtype=np.int32)}
                verify = lambda: c.call("verify", {"requests": [{"rid": "b", "n": tree_nodes}]}, tree)  # noqa: E731
                rtt = {"draft": _timed(draft, iters), "verify": _timed(verify, iters)}
                stats, _ = c.call("stats")
                c.call("health")  # round trip of an op that does no compute at all
                health = _timed(lambda: c.call("health"), iters)
        finally:
            stop_worker(proc)
    eng = {"draft": _engine_ms(engine, prefix, np.array([-1]), iters),
           "verify": _engine_ms(engine, prefix, np.arange(-1, tree_nodes - 1), iters)}
    med = statistics.median
    out: dict[str, Any] = {"engine": str(engine_dir), "prefix": prefix, "tree_nodes": tree_nodes, "iters": iters,
                           "threads": threads, "health_rtt_ms_p50": med(health)}
    for op in ("draft", "verify"):
        out[op] = {"rtt_ms_p50": med(rtt[op]), "op_ms_p50": stats["op_latency_ms"][op]["p50"],
                   "engine_ms_p50": med(eng[op]), "overhead_ms_p50": med(rtt[op]) - med(eng[op])}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-bench worker", description=__doc__.split("\n\n")[0])
    ap.add_argument("--engine", type=Path, help="engine directory (default: build a tiny llama engine)")
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--prefix", type=int, default=32, help="cached tokens before each call")
    ap.add_argument("--tree-nodes", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1, help="ONNX Runtime intra-op threads (worker and reference)")
    ap.add_argument("--json", action="store_true", help="print JSON only")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        engine_dir = args.engine
        if engine_dir is None:
            from cosine.export.build import export_engine
            from cosine.export.tiny import make_tiny_model
            engine_dir = Path(tmp) / "engine"
            export_engine(make_tiny_model(Path(tmp) / "hf", arch="llama", seed=0), engine_dir, dtype="float32",
                          progress=False)
        res = measure(engine_dir, args.iters, args.prefix, args.tree_nodes, args.threads)
    if args.json:
        print(json.dumps(res, indent=2))
        return 0
    print(f"engine {res['engine']}  prefix {res['prefix']}  iters {res['iters']}  threads {res['threads']}")
    print(f"health round trip p50: {res['health_rtt_ms_p50']:.3f} ms")
    print(f"{'op':8} {'rtt p50':>10} {'op p50':>10} {'engine p50':>11} {'overhead':>10}   (ms)")
    for op in ("draft", "verify"):
        r = res[op]
        label = op if op == "draft" else f"verify{res['tree_nodes']}"
        print(f"{label:8} {r['rtt_ms_p50']:10.3f} {r['op_ms_p50']:10.3f} {r['engine_ms_p50']:11.3f} "
              f"{r['overhead_ms_p50']:10.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
