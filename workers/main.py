"""`cosine-worker --config config.toml --name NAME`: one engine behind one ROUTER socket.

Prints ``READY <name> <endpoint>`` on stdout once it serves; exits non-zero with a clear
message when it cannot start (unknown worker, missing engine, provider not available,
port taken). SIGTERM / SIGINT shut it down cleanly.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading

from cosine.config import Config, ConfigError, load

log = logging.getLogger("cosine.worker")


def _setup_logging(cfg: Config | None, level: str | None) -> None:
    lvl = (level or (cfg.logging.level if cfg else "INFO")).upper()
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
    if cfg and cfg.logging.file:
        handlers.append(logging.FileHandler(cfg.logging.file))
    logging.basicConfig(level=lvl, handlers=handlers, force=True,
                        format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s")


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
    _setup_logging(cfg, args.log_level)

    # Heavy imports after argument/config errors, which should be instant.
    from .engine import Engine, EngineError
    from .kvcache import KVCache
    from .ops import Ops
    from .server import WorkerServer
    from .stats import Stats

    engine_dir = cfg.engine_dir(mcfg)
    log.info("worker %s starting: model %s (%s), engine %s, provider %s on %s, threads %s",
             wcfg.name, mcfg.name, mcfg.role, engine_dir, wcfg.provider, wcfg.device, wcfg.threads or "default")
    try:
        engine = Engine(engine_dir, provider=wcfg.provider, device=wcfg.device, threads=wcfg.threads)
    except EngineError as e:
        log.error("worker %s cannot start: %s", wcfg.name, e)
        return 3

    cache = KVCache(engine.num_layers, engine.num_kv_heads, engine.head_dim, engine.dtype,
                    budget_tokens=wcfg.kv_budget_tokens, max_tokens=engine.max_positions)
    stats = Stats()
    ops = Ops(engine, cache, wcfg, mcfg, cfg.limits, stats)
    server = WorkerServer(ops, cache, stats, wcfg.endpoint, cfg.limits.max_message_bytes, wcfg.idle_timeout_s)

    stop = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("worker %s: %s, shutting down", wcfg.name, signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
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
    log.info("worker %s stopped", wcfg.name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
