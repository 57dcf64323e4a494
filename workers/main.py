"""`cosine-worker --config config.toml --name NAME`: one engine behind one ROUTER socket.

Prints ``READY <name> <endpoint>`` on stdout once it serves; exits non-zero with a clear
message when it cannot start (unknown worker, missing engine, provider not available,
port taken). SIGTERM / SIGINT / SIGHUP shut it down cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from cosine.config import Config, ConfigError, load
from cosine.log import setup

log = logging.getLogger("cosine.worker")


def _setup_logging(cfg: Config | None, level: str | None, name: str = "worker") -> None:
    """cosine.log's set-up; the worker's name and pid tell the processes of one log file apart."""
    setup(level or (cfg.logging.level if cfg else "INFO"), cfg.logging.file if cfg else "", f"{name}[{os.getpid()}]")


def pin(cpus: tuple[int, ...], threads: int) -> int:
    """Pin this process to ``cpus`` (none: leave it); returns the intra-op thread count to
    use: ``threads``, or one per pinned core when that is 0."""
    if not cpus:
        return threads
    have = sorted(os.sched_getaffinity(0))
    missing = sorted(set(cpus) - set(have))
    if missing:
        raise SystemExit(f"worker: cpus {list(cpus)} includes cores {missing} this process may not use "
                         f"(allowed: {have}); fix [[workers]] cpus in config.toml")
    os.sched_setaffinity(0, cpus)
    log.info("pinned to cpus %s", list(cpus))
    return threads or len(cpus)


def _build_ops(cfg: Config, wcfg, mcfg):
    """The ops behind this worker: a neural engine with a KV cache, or a weight-free
    drafter (n-gram tables, prompt lookup) over token histories."""
    import json

    from .engine import Engine, EngineError, check_prefill_engine
    from .stats import Stats

    stats = Stats()
    threads = pin(wcfg.cpus, wcfg.threads)
    target = json.loads((cfg.engine_dir(cfg.target_model()) / "manifest.json").read_text()) \
        if mcfg.kind != "neural" else {}
    if mcfg.kind == "neural":
        from .kvcache import KVCache
        from .neural import NeuralOps

        engine_dir = cfg.engine_dir(mcfg)
        log.info("worker %s starting: model %s (%s), engine %s, provider %s on %s, threads %s",
                 wcfg.name, mcfg.name, mcfg.role, engine_dir, wcfg.provider, wcfg.device, threads or "default")
        engine = Engine(engine_dir, provider=wcfg.provider, device=wcfg.device, threads=threads, spin=wcfg.spin,
                        kv_arrays=wcfg.kv_arrays, cuda_graph=wcfg.cuda_graph,
                        min_rows=2 if mcfg.role == "target" else 1)  # decode = verify, bit for bit
        cache = KVCache(engine.num_layers, engine.num_kv_heads, engine.head_dim, engine.dtype,
                        budget_tokens=wcfg.kv_budget_tokens, max_tokens=engine.max_positions, arrays=engine.arrays)
        prefill_engine = None
        pre_dir = cfg.prefill_engine_dir(mcfg)
        if pre_dir is not None:
            prefill_engine = Engine(pre_dir, provider=wcfg.provider, device=wcfg.device, threads=threads,
                                    spin=wcfg.spin, kv_arrays=wcfg.kv_arrays,
                                    min_rows=2)  # a lone one-token prompt computes as in a batch
            check_prefill_engine(engine, prefill_engine)
            log.info("worker %s prefills prompts with %s; decodes and verifies with %s", wcfg.name, pre_dir,
                     engine_dir)
        return NeuralOps(engine, cache, wcfg, mcfg, cfg.limits, stats, prefill_engine), cache, stats

    from .weightfree import HistoryStore, WeightFreeOps

    if mcfg.kind == "ngram":
        from .ngram import NgramModel

        d = cfg.engine_dir(mcfg)
        if not (d / "manifest.json").is_file():
            raise EngineError(f"n-gram engine {d} has no manifest.json; build it with "
                              f"`cosine-export --kind ngram --corpus ... --tokenizer ... --out {d}`")
        drafter = NgramModel.load(d)
        log.info("worker %s starting: n-gram drafter %s (order %d) from %s", wcfg.name, mcfg.name, drafter.order, d)
    else:
        from .lookup import LookupDrafter

        drafter = LookupDrafter(max_ngram=3, vocab_size=int(target["vocab_size"]))
        log.info("worker %s starting: prompt-lookup drafter %s", wcfg.name, mcfg.name)
    V = int(target["vocab_size"])
    summary = {"name": mcfg.name, "architecture": mcfg.kind, "vocab_size": V, "num_layers": 0,
               "dtype": "none", "max_positions": int(target["max_positions"])}
    store = HistoryStore(wcfg.kv_budget_tokens, int(target["max_positions"]))
    return WeightFreeOps(drafter, store, V, wcfg, mcfg, stats, summary), store, stats


def _stop_on_signals(name: str) -> threading.Event:
    """An event set by SIGTERM, SIGINT, and SIGHUP (its ssh session ended: `cosine up
    --hosts` runs it under ssh -tt) unless nohup ignores that one."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("worker %s: %s, shutting down", name, signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    if signal.getsignal(signal.SIGHUP) is not signal.SIG_IGN:
        signal.signal(signal.SIGHUP, on_signal)
    return stop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-worker", description="Serve one engine over ZeroMQ (docs/protocol.md).")
    ap.add_argument("--config", required=True, help="path to config.toml")
    ap.add_argument("--name", required=True, help="the [[workers]] entry to run")
    ap.add_argument("--log-level", choices=["DEBUG", "INFO", "WARNING", "ERROR"], default=None,
                    help="overrides [logging] level")
    args = ap.parse_args(argv)

    try:
        cfg = load(args.config, check_engines=False)  # only this worker's engine must exist here
        wcfg = cfg.worker(args.name)
        mcfg = cfg.model(wcfg.model)
    except ConfigError as e:
        _setup_logging(None, args.log_level)
        log.error("%s", e)
        return 2
    _setup_logging(cfg, args.log_level, wcfg.name)

    # Heavy imports after argument/config errors, which should be instant.
    from cosine.security import stop_authenticators

    from .engine import EngineError
    from .server import WorkerServer

    try:
        ops, cache, stats = _build_ops(cfg, wcfg, mcfg)
    except EngineError as e:
        log.error("worker %s cannot start: %s", wcfg.name, e)
        return 3
    server = WorkerServer(ops, cache, stats, wcfg.endpoint, cfg.limits.max_message_bytes, wcfg.idle_timeout_s,
                          security=cfg.security)

    stop = _stop_on_signals(wcfg.name)
    try:
        server.start()
    except RuntimeError as e:
        log.error("worker %s cannot start: %s", wcfg.name, e)
        return 4
    log.info("worker %s serving on %s: KV budget %d tokens, max_batch %d, idle_timeout_s %g",
             wcfg.name, wcfg.endpoint, wcfg.kv_budget_tokens, wcfg.max_batch, wcfg.idle_timeout_s)
    log.info("READY %s %s pid %d", wcfg.name, wcfg.endpoint, os.getpid())
    print(f"READY {wcfg.name} {wcfg.endpoint}", flush=True)

    while not stop.wait(0.5):
        if server.stopped:  # a stage died; it logged why
            log.error("worker %s: server stopped unexpectedly", wcfg.name)
            server.stop()
            return 1
    server.stop()
    stop_authenticators()
    log.info("worker %s stopped", wcfg.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
