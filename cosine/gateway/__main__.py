"""`cosine-http --config config.toml` (= `python -m cosine.gateway --config config.toml`).

Serves [http] host:port with uvicorn and prints ``READY cosine-http http://HOST:PORT``
once it listens. SIGTERM / SIGINT: stop accepting, give running requests up to
SHUTDOWN_GRACE_S, cancel the rest in cosine-serve, exit 0.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from pathlib import Path

from cosine import config as cfgmod
from cosine.log import setup

log = logging.getLogger("cosine.gateway")
SHUTDOWN_GRACE_S = 3


async def _serve(server) -> None:
    async def announce() -> None:
        while not server.started:
            if server.should_exit:
                return
            await asyncio.sleep(0.05)
        h = server.config
        print(f"READY cosine-http http://{h.host}:{h.port}", flush=True)
        log.info("cosine-http listening on http://%s:%d (cosine-serve at %s)", h.host, h.port, server.endpoint)

    t = asyncio.create_task(announce())
    try:
        await server.serve()
    finally:
        t.cancel()


def _loop_factory():  # noqa: ANN202 - a callable returning an event loop, or None
    """uvloop's event loop where it is installed (a dependency on Linux, as in uvicorn's
    "standard" set), else asyncio's own."""
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-http", description="OpenAI-compatible HTTP API and Prometheus metrics "
                                 "in front of cosine-serve (docs/http.md)")
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--log-level", default=None)
    a = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(a.config, "cosine-http", check_engines=False)
    if cfg is None:
        return 2
    if cfg.http is None:
        print(f"cosine-http: {cfg.path} has no [http] table; add one (docs/http.md) to say where to listen",
              file=sys.stderr)
        return 2
    setup(a.log_level or cfg.logging.level, cfg.logging.file, "http")
    import uvicorn

    from cosine.gateway.app import create_app

    uc = uvicorn.Config(create_app(cfg), host=cfg.http.host, port=cfg.http.port, log_config=None,
                        access_log=False, timeout_graceful_shutdown=SHUTDOWN_GRACE_S, lifespan="on",
                        server_header=False)
    server = uvicorn.Server(uc)
    server.endpoint = cfg.controller.endpoint  # type: ignore[attr-defined]
    # uvicorn handles SIGTERM/SIGINT while it serves (graceful stop), then re-raises the
    # signal to the handler that was there before: this one, so that a requested stop
    # exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, _frame: log.info("signal %d: stopped", signum))
    with asyncio.Runner(loop_factory=_loop_factory()) as runner:
        runner.run(_serve(server))
    if not server.started:
        log.error("cosine-http could not listen on %s:%d (see above)", cfg.http.host, cfg.http.port)
        return 1
    log.info("cosine-http stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
