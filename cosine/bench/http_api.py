"""`cosine-bench run --api openai`: the HTTP gateway's added latency over the ZeroMQ client.

    cosine-bench run --api openai --config config.toml --concurrency 1,16 --mode cosine [--out DIR]

Starts the local cluster and `cosine-http` (unless one already answers at [http]), then
sends every request twice, once through the ZeroMQ client and once through the OpenAI
API (streaming, so both give a client-side time to first token), in waves of
CONCURRENCY requests sent at once; the two APIs take turns per wave, in alternating order,
so machine-speed drift falls on both alike. Reports p50 / p95 of latency and time to first
token per API and of the per-request difference (HTTP minus ZeroMQ), and counts greedy
outputs that differ (there must be none). Writes results.json and results.md in --out.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import platform
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cosine import config as cfgmod
from cosine.bench import prompts as promptsets
from cosine.bench.http_load import completion, connect
from cosine.log import setup

log = logging.getLogger("cosine.bench")


def _zmq_one(endpoint: str, curve: Any, prompt: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    from cosine.client import Client

    with Client(endpoint, timeout_s=args.timeout, curve=curve) as c:
        t0 = time.perf_counter()
        s = c.generate(prompt, max_tokens=args.max_tokens, mode=args.mode, stream=True, seed=seed, ignore_eos=True)
        ttft, text = None, []
        for ch in s:
            ttft = ttft if ttft is not None else time.perf_counter() - t0
            text.append(ch.text)
        wall = time.perf_counter() - t0
    return {"latency_s": wall, "ttft_s": ttft if ttft is not None else wall, "text": "".join(text)}


_conns = threading.local()  # each client thread's kept-alive connection to the gateway


def _http_one(base: str, key: str, model: str, prompt: str, args: argparse.Namespace, seed: int) -> dict[str, Any]:
    # On a kept-alive connection, as the openai SDK sends (httpx's pool): the ZeroMQ client's
    # time starts after its connection is up too, so neither side counts a connect.
    if getattr(_conns, "base", None) != base:
        _conns.base, _conns.conn = base, connect(base, args.timeout)
    return completion(base, key, model, prompt, max_tokens=args.max_tokens, mode=args.mode, timeout_s=args.timeout,
                      seed=seed, conn=_conns.conn)


def _pct(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, float)
    return {"p50_ms": float(np.percentile(a, 50) * 1e3), "p95_ms": float(np.percentile(a, 95) * 1e3)}


def run_level(c: int, items: list[tuple[str, str]], one: dict[str, Any], args: argparse.Namespace) -> dict[str, Any]:
    """Waves of ``c`` requests, each through both APIs (order alternating per wave)."""
    recs: list[dict[str, Any]] = []
    work = [(i, p) for r in range(max(1, args.repeat)) for i, (_, p) in enumerate(items)]
    waves = [work[j:j + c] for j in range(0, len(work), c)]
    with ThreadPoolExecutor(c) as ex:
        for w, wave in enumerate(waves):
            got: dict[str, list[dict[str, Any]]] = {}
            for api in (("zmq", "http") if w % 2 == 0 else ("http", "zmq")):
                got[api] = [f.result() for f in [ex.submit(one[api], p, args.seed + i) for i, p in wave]]
            for (i, _), z, h in zip(wave, got["zmq"], got["http"]):
                recs.append({"prompt": i, "zmq": z, "http": h})
    added = {k: _pct([r["http"][k] - r["zmq"][k] for r in recs]) for k in ("latency_s", "ttft_s")}
    return {"concurrency": c, "requests": len(recs),
            "zmq": {k: _pct([r["zmq"][k] for r in recs]) for k in ("latency_s", "ttft_s")},
            "http": {k: _pct([r["http"][k] for r in recs]) for k in ("latency_s", "ttft_s")},
            "added": added, "greedy_mismatches": sum(r["zmq"]["text"] != r["http"]["text"] for r in recs),
            "records": recs}


def markdown(res: dict[str, Any]) -> str:
    rows = ["| concurrency | requests | latency p50 / p95 ZeroMQ (ms) | HTTP (ms) | added p50 / p95 (ms) "
            "| TTFT p50 / p95 ZeroMQ (ms) | HTTP (ms) | TTFT added p50 / p95 (ms) | greedy mismatches |",
            "|---|---|---|---|---|---|---|---|---|"]
    f = lambda d: f"{d['p50_ms']:.1f} / {d['p95_ms']:.1f}"  # noqa: E731
    for lv in res["levels"]:
        rows.append(f"| {lv['concurrency']} | {lv['requests']} | {f(lv['zmq']['latency_s'])} | "
                    f"{f(lv['http']['latency_s'])} | {f(lv['added']['latency_s'])} | {f(lv['zmq']['ttft_s'])} | "
                    f"{f(lv['http']['ttft_s'])} | {f(lv['added']['ttft_s'])} | {lv['greedy_mismatches']} |")
    return (f"# HTTP gateway overhead ({res['date']}, {res['host']})\n\n`{res['command']}`\n\n"
            f"Mode {res['mode']}, {res['max_tokens']} new tokens per request, streaming on both APIs; "
            f"added = HTTP minus ZeroMQ on the same request (p50 / p95 over requests).\n\n" + "\n".join(rows) + "\n")


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(prog="cosine-bench run --api openai", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--api", choices=["openai"], required=True)
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--mode", default="cosine")
    ap.add_argument("--domains", default="code,docs,prose,german")
    ap.add_argument("--prompts", type=Path, default=None, help="prompts JSON from `cosine datasets build`")
    ap.add_argument("--per-domain", type=int, default=0)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--concurrency", default="1,16")
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=None, help="default docs/benchmarks/DATE-HOST-http")
    args = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(args.config, "cosine-bench")
    if cfg is None:
        return 2
    if cfg.http is None:
        ap.error(f"{cfg.path} has no [http] table: the gateway has nowhere to listen")
    setup(cfg.logging.level, cfg.logging.file, "bench")
    from cosine.control.cluster import LocalCluster
    from cosine.gateway.process import GatewayProcess
    from cosine.security import CurveKeys

    items = promptsets.load(args.domains.split(","), args.prompts, args.per_domain)
    out = args.out or Path("docs/benchmarks") / f"{dt.date.today().isoformat()}-{platform.node() or 'host'}-http"
    out.mkdir(parents=True, exist_ok=True)
    base, key = f"http://{cfg.http.host}:{cfg.http.port}", (cfg.http.api_keys or ("",))[0]
    model, curve = cfg.http.model_name or cfg.target_model().name, CurveKeys.from_config(cfg.security)
    res: dict[str, Any] = {"command": "cosine-bench run " + " ".join(argv), "mode": args.mode,
                           "max_tokens": args.max_tokens, "host": platform.node(),
                           "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), "levels": []}
    with LocalCluster(args.config) as cluster, GatewayProcess(args.config, base):
        one = {"zmq": lambda p, s: _zmq_one(cluster.endpoint, curve, p, args, s),
               "http": lambda p, s: _http_one(base, key, model, p, args, s)}
        one["http"](items[0][1], args.seed)  # warm both paths (connections, first-request costs)
        one["zmq"](items[0][1], args.seed)
        for c in [int(x) for x in args.concurrency.split(",") if x]:
            lv = run_level(c, items, one, args)
            log.info("concurrency %d: added latency p50 %.1f ms, TTFT p50 %.1f ms, %d greedy mismatches", c,
                     lv["added"]["latency_s"]["p50_ms"], lv["added"]["ttft_s"]["p50_ms"], lv["greedy_mismatches"])
            res["levels"].append(lv)
    (out / "results.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "results.md").write_text(markdown(res))
    print(markdown(res))
    return 0 if all(lv["greedy_mismatches"] == 0 for lv in res["levels"]) else 1
