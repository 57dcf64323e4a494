"""The benchmark run: modes x concurrency levels (closed loop) + an open-loop Poisson
run, through one local cluster, plus HF peers on the same prompts. Writes raw records,
a summary with the ratios, a markdown table and plots into --out."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from cosine import config as cfgmod
from cosine.bench import prompts as promptsets
from cosine.log import setup

log = logging.getLogger("cosine.bench")
MODES = ("autoregressive", "speculative", "specinfer", "cosine")
LLAMACPP = ("llamacpp", "llamacpp-lookup", "llamacpp-draft")  # cosine/bench/llamacpp.py
BASELINES = ("autoregressive", "speculative", "specinfer") + LLAMACPP


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        return ""


def environment(cfg: cfgmod.Config, argv: list[str]) -> dict:
    import onnxruntime as ort

    engines = {}
    for m in cfg.models:
        man = cfg.engine_dir(m) / "manifest.json"
        if man.is_file():
            j = json.loads(man.read_text())
            engines[m.name] = {"dir": str(cfg.engine_dir(m)), "dtype": j.get("dtype"),
                               "architecture": j.get("architecture"), "source_sha256": j.get("source_sha256")}
    return {
        "command": "cosine-bench " + " ".join(argv), "git_commit": _git_commit(),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version()},
        "onnxruntime": ort.__version__, "available_providers": ort.get_available_providers(),
        "workers": [{"name": w.name, "model": w.model, "device": w.device, "provider": w.provider,
                     "endpoint": w.endpoint} for w in cfg.workers],
        "engines": engines,
    }


def _one(client, domain: str, prompt: str, mode: str, args, seed: int) -> dict:
    t0 = time.perf_counter()
    r = client.generate(prompt, max_tokens=args.max_tokens, temperature=args.temperature, mode=mode,
                        seed=seed, ignore_eos=True)
    wall = time.perf_counter() - t0
    s = dict(r.stats)
    return {"mode": mode, "domain": domain, "prompt": prompt[:60], "tokens": len(r.token_ids),
            "token_ids": list(r.token_ids), "wall_s": wall, **{k: v for k, v in s.items() if k != "tokens"}}


def closed_loop(endpoint: str, items: list[tuple[str, str]], mode: str, concurrency: int, args) -> tuple[list, float]:
    """`concurrency` clients, each with its own socket, loop over the shared prompt list."""
    from cosine.client import Client

    lock, cursor, out = threading.Lock(), [0], []
    total = len(items) * max(1, args.repeat)

    def worker() -> None:
        with Client(endpoint, timeout_s=args.timeout, curve=args.curve) as c:
            while True:
                with lock:
                    i = cursor[0]
                    cursor[0] += 1
                if i >= total:
                    return
                d, p = items[i % len(items)]
                rec = _one(c, d, p, mode, args, seed=args.seed + i)
                rec["concurrency"], rec["pass"] = concurrency, i // len(items)
                with lock:
                    out.append(rec)

    t0 = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as ex:
        for f in [ex.submit(worker) for _ in range(concurrency)]:
            f.result()
    return out, time.perf_counter() - t0


def interleaved(endpoint: str, items: list[tuple[str, str]], modes: list[str], concurrency: int, args,
                peers: list | None = None, encode: Any = None
                ) -> tuple[dict[str, list], dict[str, float], dict[str, dict], dict[str, list]]:
    """The modes take turns on each wave of `concurrency` prompts (wave 1 in every mode,
    then wave 2, ...; at concurrency 1 a wave is one prompt), the wave's requests sent at
    once from their own sockets. A drift in machine speed over the run (10-25% on a shared
    VM) thus falls on every mode alike instead of on whichever mode ran last. Peers
    (llama.cpp, cosine/bench/llamacpp.py) take their turn after the modes, serving the
    wave's prompts (``encode``: text -> the target's token ids) one after another. Returns,
    per mode or peer: records (with the wave's wall time), summed wall time, summed server
    counters and the rounds' timeline."""
    from cosine.client import Client

    peers = peers or []
    names = modes + [p.name for p in peers]
    recs: dict[str, list] = {m: [] for m in names}
    wall = {m: 0.0 for m in names}
    counters: dict[str, dict] = {m: {} for m in names}
    lines: dict[str, list] = {m: [] for m in names}
    waves = [items[j:j + concurrency] for j in range(0, len(items), concurrency)]

    def one(d: str, p: str, mode: str, seed: int) -> dict:
        with Client(endpoint, timeout_s=args.timeout, curve=args.curve) as c:  # its own socket and thread
            return _one(c, d, p, mode, args, seed)

    with Client(endpoint, timeout_s=args.timeout, curve=args.curve) as admin, ThreadPoolExecutor(concurrency) as ex:
        for w in range(len(waves) * max(1, args.repeat)):
            wave, first = waves[w % len(waves)], (w % len(waves)) * concurrency + (w // len(waves)) * len(items)
            for mode in modes:
                before = admin.stats()
                t0 = time.perf_counter()
                got = [f.result() for f in [ex.submit(one, d, p, mode, args.seed + first + j)
                                            for j, (d, p) in enumerate(wave)]]
                secs = time.perf_counter() - t0
                after = admin.stats(timeline=4096)
                for rec in got:
                    rec.update({"concurrency": concurrency, "pass": w // len(waves), "wave": w % len(waves),
                                "wave_wall_s": secs, "turn": sum(map(len, recs.values()))})
                    recs[mode].append(rec)
                wall[mode] += secs
                for k, v in _counters(before, after).items():
                    counters[mode][k] = counters[mode].get(k, 0.0) + v
                lines[mode] += [t for t in after.get("timeline", []) if t[0] >= before["uptime_s"]]
                log.info("[wave %d/%d @%d] %s: %.2f tok/s", w + 1, len(waves) * max(1, args.repeat), concurrency,
                         mode, sum(r["tokens"] for r in got) / max(secs, 1e-9))
            for peer in peers:
                got = [_peer_one(peer, d, p, encode, args) for d, p in wave]
                secs = sum(r["wall_s"] for r in got)
                for rec in got:
                    rec.update({"concurrency": concurrency, "pass": w // len(waves), "wave": w % len(waves),
                                "wave_wall_s": secs, "turn": sum(map(len, recs.values()))})
                    recs[peer.name].append(rec)
                wall[peer.name] += secs
                log.info("[wave %d/%d @%d] %s: %.2f tok/s", w + 1, len(waves) * max(1, args.repeat), concurrency,
                         peer.name, sum(r["tokens"] for r in got) / max(secs, 1e-9))
    return recs, wall, counters, lines


def _peer_one(peer: Any, domain: str, prompt: str, encode: Any, args) -> dict:
    new, secs = peer.generate(encode(prompt), args.max_tokens)
    return {"mode": peer.name, "peer": peer.name, "domain": domain, "prompt": prompt[:60], "tokens": len(new),
            "token_ids": new, "wall_s": secs}


def open_loop(endpoint: str, items: list[tuple[str, str]], mode: str, rate: float, n: int, args) -> tuple[list, float]:
    """Poisson arrivals at `rate` requests/s, each request on its own client."""
    from cosine.client import Client

    rng = np.random.default_rng(args.seed)
    gaps = rng.exponential(1.0 / rate, size=n)
    out, lock = [], threading.Lock()

    def fire(i: int) -> None:
        d, p = items[i % len(items)]
        with Client(endpoint, timeout_s=args.timeout, curve=args.curve) as c:
            rec = _one(c, d, p, mode, args, seed=args.seed + i)
        rec["arrival"] = "poisson"
        with lock:
            out.append(rec)

    t0 = time.perf_counter()
    threads = []
    for i, g in enumerate(gaps):
        time.sleep(g)
        th = threading.Thread(target=fire, args=(i,))
        th.start()
        threads.append(th)
    for th in threads:
        th.join()
    return out, time.perf_counter() - t0


def summarize(records: list[dict], wall: float) -> dict:
    toks = np.array([r["tokens"] for r in records], dtype=float)
    lat = np.array([r["wall_s"] for r in records])
    per_tok = lat / np.maximum(toks, 1)
    s = {
        "requests": len(records), "tokens": int(toks.sum()), "wall_s": wall,
        "tokens_per_s": float(toks.sum() / wall) if wall else 0.0,
        "tokens_per_s_per_request": float(np.mean(toks / np.maximum(lat, 1e-9))),
        "latency_per_token_ms_p50": float(np.percentile(per_tok, 50) * 1e3),
        "latency_per_token_ms_p95": float(np.percentile(per_tok, 95) * 1e3),
    }
    if records and "ttft_s" in records[0]:
        s["ttft_ms_p50"] = float(np.percentile([r["ttft_s"] for r in records], 50) * 1e3)
    if records and "mean_accepted_length" in records[0]:
        s["mean_accepted_length"] = float(np.mean([r["mean_accepted_length"] for r in records]))
        by_domain: dict[str, list[float]] = {}
        for r in records:
            by_domain.setdefault(r["domain"], []).append(r["mean_accepted_length"])
        s["mean_accepted_length_by_domain"] = {d: float(np.mean(v)) for d, v in by_domain.items()}
        # per drafter: the requests each drafter drafted for (routed requests may use several)
        by_drafter: dict[str, list[float]] = {}
        for r in records:
            for d in r.get("drafters_used") or []:
                by_drafter.setdefault(d, []).append(r["mean_accepted_length"])
        if by_drafter:
            s["mean_accepted_length_by_drafter"] = {d: float(np.mean(v)) for d, v in sorted(by_drafter.items())}
    return s


def peer_items(items: list[tuple[str, str]], per_domain: int) -> list[tuple[str, str]]:
    """The first ``per_domain`` prompts of each domain (0 = all), in the run's order."""
    if per_domain <= 0:
        return items
    seen: dict[str, int] = {}
    out = []
    for d, p in items:
        seen[d] = seen.get(d, 0) + 1
        if seen[d] <= per_domain:
            out.append((d, p))
    return out


def run_peers(cfg: cfgmod.Config, items: list[tuple[str, str]], args) -> list[dict]:
    """Greedy generate() and assisted generation on --peer-device in --peer-dtype, after one
    untimed warm-up generation each (a GPU's kernels and allocator are not generation time)."""
    from cosine import models
    from cosine.bench import peers

    why = peers.available()
    if why:
        log.warning(why)
        return [{"peer": "skipped", "reason": why}]
    target_src = cfg.target_model().source
    drafters = [m for m in cfg.models if m.role == "drafter" and m.kind == "neural" and m.source]
    resolve = lambda s: Path(s) if Path(s).exists() else (models.cached_path(s) or models.fetch(s))  # noqa: E731
    device, dtype = args.peer_device, args.peer_dtype
    target = peers.load(resolve(target_src), device, dtype)
    assistant = peers.load(resolve(drafters[0].source), device, dtype) if drafters else None
    out = []
    wanted = set((args.peers or "").split(","))
    for name, asst in (("hf", None), ("hf-assisted", assistant)):
        if name not in wanted or (name == "hf-assisted" and asst is None):
            continue
        for i, (d, p) in enumerate(items):
            ids = target.tokenizer(p)["input_ids"]
            if i == 0:
                peers.generate(target, ids, min(8, args.max_tokens), assistant=asst)  # warm-up, untimed
            new, secs = peers.generate(target, ids, args.max_tokens, assistant=asst)
            out.append({"peer": name, "mode": name, "domain": d, "prompt": p[:60], "tokens": len(new),
                        "token_ids": new, "wall_s": secs, "concurrency": 1, "device": device, "dtype": dtype})
            log.info("%s [%s] %d tokens in %.2f s on %s", name, d, len(new), secs, device)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="cosine-bench", description=__doc__)
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--modes", default=",".join(MODES))
    ap.add_argument("--peers", default="hf,hf-assisted",
                    help="comma list of hf, hf-assisted (Hugging Face, after the cluster run) and "
                         f"{', '.join(LLAMACPP)} (llama.cpp on the target's GGUF, interleaved with the modes; "
                         "needs --interleave); '' or 'none' for none")
    ap.add_argument("--llama-server", type=Path, default=None,
                    help="llama-server binary for the llamacpp-draft peer (llama.cpp's draft-model speculation)")
    ap.add_argument("--llama-threads", type=int, default=os.cpu_count() or 2,
                    help="threads of the llama.cpp peers (default: every core, as the cluster's workers share them)")
    ap.add_argument("--peer-device", default="cpu", help="where the HF peers run: cpu | cuda:N")
    ap.add_argument("--peer-dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    ap.add_argument("--peer-per-domain", type=int, default=0,
                    help="the HF peers generate for the first N prompts of each domain only (0 = all)")
    ap.add_argument("--domains", default="code,docs,prose,german")
    ap.add_argument("--prompts", type=Path, default=None, help="prompts JSON from `cosine datasets build`")
    ap.add_argument("--per-domain", type=int, default=0, help="prompts per domain (0 = all)")
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--concurrency", default="1,4,16")
    ap.add_argument("--repeat", type=int, default=1, help="passes over the prompt list per level")
    ap.add_argument("--interleave", action="store_true",
                    help="the modes take turns on each wave of CONCURRENCY prompts sent at once (paired "
                         "comparison: machine-speed drift falls on every mode alike)")
    ap.add_argument("--poisson-rate", type=float, default=0.0, help="requests/s for an open-loop run (0 = none)")
    ap.add_argument("--poisson-requests", type=int, default=16)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=1800.0)
    ap.add_argument("--out", type=Path, default=None, help="results directory (default docs/benchmarks/DATE-HOST)")
    args = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(args.config, "cosine-bench")
    if cfg is None:
        return 2
    setup(cfg.logging.level, cfg.logging.file, "bench")
    modes = [m for m in args.modes.split(",") if m]
    bad = sorted(set(modes) - set(MODES))
    if bad:
        ap.error(f"unknown modes {bad}; known: {', '.join(MODES)}")
    if args.interleave and args.poisson_rate > 0:
        ap.error("--interleave pairs closed waves of requests; run --poisson-rate without it")
    peer_names = [p for p in (args.peers or "").split(",") if p and p != "none"]
    unknown = sorted(set(peer_names) - set(LLAMACPP) - {"hf", "hf-assisted"})
    if unknown:
        ap.error(f"unknown peers {unknown}; known: hf, hf-assisted, {', '.join(LLAMACPP)}")
    llama_names = [p for p in peer_names if p in LLAMACPP]
    if llama_names and not args.interleave:
        ap.error("llama.cpp peers run interleaved with the modes: add --interleave")
    if not re.fullmatch(r"cpu|cuda(:\d+)?", args.peer_device):
        ap.error(f"--peer-device must be cpu or cuda:N, got {args.peer_device!r}")
    levels = [int(c) for c in args.concurrency.split(",") if c]
    items = promptsets.load(args.domains.split(","), args.prompts, args.per_domain)
    out = args.out or Path("docs/benchmarks") / f"{dt.date.today().isoformat()}-{platform.node() or 'host'}"
    out.mkdir(parents=True, exist_ok=True)
    env = environment(cfg, argv)
    from cosine.security import CurveKeys

    args.curve = CurveKeys.from_config(cfg.security)  # the bench clients connect like any client
    records: list[dict] = []
    summary: dict = {}
    timelines: dict[str, list] = {}  # mode@level -> rounds' phases (ControllerStats.timeline)

    from cosine.client import Client
    from cosine.control.cluster import LocalCluster

    llama_peers, skipped = _start_llama_peers(cfg, llama_names, args)
    with LocalCluster(args.config) as cluster:
        encode = _encoder(cfg)
        for c in levels if args.interleave else []:
            recs, walls, counters, lines = interleaved(cluster.endpoint, items, modes, c, args, llama_peers, encode)
            for mode in modes:
                records += recs[mode]
                summary[f"{mode}@{c}"] = {**summarize(recs[mode], walls[mode]),
                                          "server_stats_delta": _fractions(counters[mode])}
                timelines[f"{mode}@{c}"] = lines[mode]
            for peer in llama_peers:
                records += recs[peer.name]
                summary[f"{peer.name}@{c}"] = {**summarize(recs[peer.name], walls[peer.name]),
                                               "peak_rss_bytes": peer.peak_rss}
        for mode in modes if not args.interleave else []:
            for c in levels:
                log.info("mode %s, concurrency %d, %d prompts", mode, c, len(items))
                with Client(cluster.endpoint, curve=args.curve) as admin:
                    before = admin.stats()
                recs, wall = closed_loop(cluster.endpoint, items, mode, c, args)
                with Client(cluster.endpoint, curve=args.curve) as admin:
                    after = admin.stats(timeline=4096)
                records += recs
                summary[f"{mode}@{c}"] = {**summarize(recs, wall), "server_stats_delta": _delta(before, after)}
                timelines[f"{mode}@{c}"] = [t for t in after.pop("timeline", []) if t[0] >= before["uptime_s"]]
                log.info("%s@%d: %.2f tok/s", mode, c, summary[f"{mode}@{c}"]["tokens_per_s"])
            if args.poisson_rate > 0:
                recs, wall = open_loop(cluster.endpoint, items, mode, args.poisson_rate, args.poisson_requests, args)
                records += recs
                summary[f"{mode}@poisson{args.poisson_rate:g}"] = summarize(recs, wall)
        rss = {**_worker_rss(cfg, args), **{p.name: p.peak_rss for p in llama_peers}}
    for peer in llama_peers:
        peer.close()
    records += [{"peer": s["peer"], "skipped": s["reason"]} for s in skipped]
    if {"hf", "hf-assisted"} & set(peer_names):
        peer_recs = run_peers(cfg, peer_items(items, args.peer_per_domain), args)
        records += peer_recs
        for name in ("hf", "hf-assisted"):
            rs = [r for r in peer_recs if r.get("peer") == name]
            if rs:
                summary[f"{name}@1"] = summarize(rs, sum(r["wall_s"] for r in rs))
    result = {"environment": env, "args": {k: str(v) for k, v in vars(args).items() if k != "curve"},
              "summary": summary, "peak_rss_bytes": rss, "ratios": ratios(summary), "paired_ratios": paired_ratios(records),
              "identity": identity(records) if args.temperature == 0 else
              {"checked": 0, "mismatches": [], "note": "sampling: outputs differ from autoregressive by design; "
               "the distribution is checked by tests/test_control_sampling.py"}, "timelines": timelines, "records": records}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    from cosine.bench.report import write_markdown, write_plots
    write_markdown(result, out / "results.md")
    write_plots(result, out)
    print((out / "results.md").read_text())
    log.info("results in %s", out)
    return 0


def _worker_rss(cfg: cfgmod.Config, args) -> dict[str, int]:
    """Each worker's peak resident memory so far (its `stats` op)."""
    from cosine.workers.client import WorkerClient, WorkerError

    out = {}
    for w in cfg.workers:
        try:
            with WorkerClient(w.endpoint, timeout_s=10, curve=args.curve) as c:
                out[w.name] = int(c.call("stats", {}, {})[0].get("peak_rss_bytes", 0))
        except (WorkerError, OSError) as e:
            log.warning("peak RSS of %s unknown: %s", w.name, e)
    return out


def _encoder(cfg: cfgmod.Config) -> Any:
    """text -> the target's token ids, exactly as cosine-serve tokenizes a prompt."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(cfg.engine_dir(cfg.target_model()) / "tokenizer.json"))
    return lambda text: tok.encode(text).ids


def _start_llama_peers(cfg: cfgmod.Config, names: list[str], args) -> tuple[list, list[dict]]:
    """llama.cpp peers on the target's GGUF (and the first neural drafter's, for -md)."""
    if not names:
        return [], []
    from cosine import models
    from cosine.bench import llamacpp

    def gguf(source: str) -> Path | None:
        p = Path(source).expanduser() if source else None
        if p is not None and p.suffix == ".gguf" and p.is_file():
            return p
        return models.cached_path(source) if source else None

    target = gguf(cfg.target_model().source)
    if target is None:
        return [], [{"peer": n, "reason": "the target's `source` is no GGUF file here"} for n in names]
    drafters = [m for m in cfg.models if m.role == "drafter" and m.kind == "neural"]
    draft = gguf(drafters[0].source) if drafters else None
    return llamacpp.start(names, target, draft, args.llama_threads, args.llama_server, _free_port())


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _counters(before: dict, after: dict) -> dict:
    """The controller's additive counters between two stats snapshots."""
    d = lambda k: (after.get(k) or 0.0) - (before.get(k) or 0.0)  # noqa: E731
    out = {k: d(k) for k in ("rounds", "gated_rounds", "busy_wall_s", "pipeline_overlap_s", "verify_busy_s")}
    busy = [(a.get("busy_s") or 0.0) - ((before.get("drafters") or {}).get(n, {}).get("busy_s") or 0.0)
            for n, a in (after.get("drafters") or {}).items()]
    if busy:
        out["drafter_busy_mean_s"] = sum(busy) / len(busy)
    return out


def _fractions(c: dict) -> dict:
    """Counters -> rounds, gated rounds, and the verifier's and drafters' idle fractions of
    the time the controller had work."""
    wall = c.get("busy_wall_s", 0.0)
    out = {k: c.get(k, 0.0) for k in ("rounds", "gated_rounds", "busy_wall_s", "pipeline_overlap_s")}
    if wall > 0:
        out["verifier_idle_frac"] = max(0.0, 1.0 - c.get("verify_busy_s", 0.0) / wall)
        if "drafter_busy_mean_s" in c:
            out["drafter_idle_frac"] = max(0.0, 1.0 - c["drafter_busy_mean_s"] / wall)
    return out


def _delta(before: dict, after: dict) -> dict:
    """Controller counters accumulated during one level (see ``_fractions``)."""
    return _fractions(_counters(before, after))


def ratios(summary: dict) -> dict:
    """cosine over each baseline, at each level where both ran."""
    out = {}
    for key, s in summary.items():
        if not key.startswith("cosine@"):
            continue
        level = key.split("@", 1)[1]
        for base in BASELINES + ("hf", "hf-assisted"):
            b = summary.get(f"{base}@{level}")
            if b and b["tokens_per_s"] > 0:
                out[f"cosine/{base}@{level}"] = s["tokens_per_s"] / b["tokens_per_s"]
    return out


def paired_values(records: list[dict]) -> dict[str, list[float]]:
    """cosine over each baseline wave by wave (``interleaved``; at concurrency 1 a wave is
    one prompt): the waves' tokens/s ratios over the (wave, pass) pairs both modes ran,
    keyed "cosine/<baseline>@<concurrency>". A pair shares its prompts and, when
    interleaved, its minute of machine speed. Records without waves pair per prompt at
    concurrency 1."""
    acc: dict[tuple, list[float]] = {}  # (mode, level, pass, wave) -> [tokens, seconds]
    for r in records:
        if r.get("mode") not in MODES + LLAMACPP or not r.get("wall_s"):
            continue
        if "wave" in r:
            key = (r["mode"], r["concurrency"], r["pass"], r["wave"])
            acc.setdefault(key, [0.0, r["wave_wall_s"]])[0] += r["tokens"]
        elif r.get("concurrency") == 1:
            acc[(r["mode"], 1, r.get("pass", 0), r["prompt"])] = [r["tokens"], r["wall_s"]]
    rate = {k: t / s for k, (t, s) in acc.items() if s > 0}
    out: dict[str, list[float]] = {}
    for base in BASELINES:
        by_level: dict[int, list[float]] = {}
        for (m, c, k, w), v in rate.items():
            if m == base and ("cosine", c, k, w) in rate and v > 0:
                by_level.setdefault(c, []).append(rate[("cosine", c, k, w)] / v)
        for c, rs in sorted(by_level.items()):
            out[f"cosine/{base}@{c}"] = rs
    return out


def summarize_pairs(rs: list[float]) -> dict:
    """Geometric mean, bootstrap interval, range and wins of paired ratios."""
    return {"geomean": float(np.exp(np.mean(np.log(rs)))), "min": float(min(rs)), "max": float(max(rs)),
            "pairs": len(rs), "cosine_faster": int(sum(x > 1.0 for x in rs)), "ci95": geomean_ci(rs)}


def paired_ratios(records: list[dict]) -> dict:
    """``paired_values`` summarized per baseline and concurrency (``summarize_pairs``)."""
    return {k: summarize_pairs(rs) for k, rs in paired_values(records).items()}


def geomean_ci(ratios: list[float], level: float = 0.95, resamples: int = 4000) -> list[float]:
    """Percentile bootstrap interval of the geometric mean of paired ratios (fixed seed, so a
    report is reproducible). An interval that holds 1.0 means the run cannot tell the two
    modes apart. Pairs of one prompt in two passes are not independent, so it is, if
    anything, too narrow."""
    logs = np.log(np.asarray(ratios, dtype=float))
    if logs.size < 2:
        return [float(np.exp(logs.mean()))] * 2
    rng = np.random.default_rng(0)
    means = logs[rng.integers(0, logs.size, size=(resamples, logs.size))].mean(axis=1)
    lo, hi = np.quantile(means, [(1 - level) / 2, (1 + level) / 2])
    return [float(np.exp(lo)), float(np.exp(hi))]


def identity(records: list[dict]) -> dict:
    """Greedy losslessness check inside the benchmark: every mode's tokens must equal
    autoregressive's for the same prompt."""
    ref = {r["prompt"]: r["token_ids"] for r in records if r.get("mode") == "autoregressive"}
    bad = [(r["mode"], r["prompt"]) for r in records
           if r.get("mode") in MODES and r["prompt"] in ref and r["token_ids"] != ref[r["prompt"]]]
    # Peers run another engine on the same weights (llama.cpp's kernels): how far their
    # greedy text agrees with cosine's is informative, never a failure. llama.cpp's own
    # speculative modes are compared with its greedy decoding too: with quantized weights
    # they are not bit-exact either (docs/export.md, "Exactness").
    own = {r["prompt"]: r["token_ids"] for r in records if r.get("mode") == "llamacpp"}
    return {"checked": sum(1 for r in records if r.get("mode") in MODES and r["prompt"] in ref),
            "mismatches": bad, "peers_against_autoregressive": _agreement(records, LLAMACPP, ref),
            "peers_against_llamacpp": _agreement(records, tuple(m for m in LLAMACPP if m != "llamacpp"), own)}


def _agreement(records: list[dict], modes: tuple[str, ...], ref: dict[str, list[int]]) -> dict[str, dict]:
    """Per mode: how many outputs equal ``ref``'s for the same prompt, and the mean common prefix."""
    out: dict[str, dict] = {}
    for r in records:
        if r.get("mode") in modes and r["prompt"] in ref:
            a, b = r["token_ids"], ref[r["prompt"]]
            common = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
            p = out.setdefault(r["mode"], {"identical": 0, "requests": 0, "common_prefix": []})
            p["identical"] += a == b
            p["requests"] += 1
            p["common_prefix"].append(common)
    for p in out.values():
        p["mean_common_prefix"] = float(np.mean(p.pop("common_prefix")))
    return out
