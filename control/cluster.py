"""`cosine up`: start every worker of config.toml and cosine-serve as local processes.

Workers start in parallel; serve starts once all are healthy (it waits for them itself
as well). Ctrl-C / SIGTERM, or any child dying, stops everything: SIGTERM first, SIGKILL
after a timeout. `LocalCluster` is the same as a context manager (tests, `make demo`).
"""

from __future__ import annotations

import argparse
import collections
import logging
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from cosine import config as cfgmod
from cosine.log import setup

log = logging.getLogger("cosine.control.cluster")


class ClusterError(RuntimeError):
    pass


class _Child:
    """A subprocess whose output is pumped (a full pipe would block it) and echoed."""

    def __init__(self, name: str, cmd: list[str], echo: bool):
        self.name, self.cmd = name, cmd
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.ready = threading.Event()
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, bufsize=1,
                                     start_new_session=True)  # Ctrl-C reaches us only; we stop children in order
        for stream, watch in ((self.proc.stdout, True), (self.proc.stderr, False)):
            threading.Thread(target=self._pump, args=(stream, watch, echo), daemon=True).start()

    def _pump(self, stream: Any, watch: bool, echo: bool) -> None:
        for line in stream:
            line = line.rstrip("\n")
            self.tail.append(line)
            if watch and line.startswith("READY"):
                self.ready.set()
            if echo:
                print(f"[{self.name}] {line}", file=sys.stderr, flush=True)

    def wait_ready(self, deadline: float) -> None:
        while not self.ready.wait(0.05):
            if self.proc.poll() is not None:
                time.sleep(0.1)
                raise ClusterError(f"{self.name} exited with code {self.proc.returncode} before it was ready:\n"
                                   + "\n".join(list(self.tail)[-30:]))
            if time.monotonic() > deadline:
                raise ClusterError(f"{self.name} was not ready in time:\n" + "\n".join(list(self.tail)[-30:]))

    def stop(self, timeout_s: float) -> int | None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                log.warning("%s did not stop in %.0f s; killing it", self.name, timeout_s)
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


class LocalCluster:
    """All workers + cosine-serve of one config as subprocesses.

        with LocalCluster("config.toml") as c:
            Client(c.endpoint).generate(...)
    """

    def __init__(self, config_path: str | Path, log_level: str | None = None, echo: bool = False,
                 start_timeout_s: float = 120.0, stop_timeout_s: float = 10.0, serve_args: list[str] | None = None):
        self.config_path = Path(config_path).resolve()
        self.cfg = cfgmod.load(self.config_path)
        self.log_level = log_level
        self.echo = echo
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.serve_args = serve_args or []
        self.workers: dict[str, _Child] = {}
        self.serve: _Child | None = None
        self.endpoint = self.cfg.controller.endpoint

    def _worker_cmd(self, name: str) -> list[str]:
        cmd = [sys.executable, "-m", "cosine.workers.main", "--config", str(self.config_path), "--name", name]
        return cmd + (["--log-level", self.log_level.upper()] if self.log_level else [])

    def start_worker(self, name: str) -> None:
        """(Re)start one worker and wait until it serves."""
        self.workers[name] = _Child(name, self._worker_cmd(name), self.echo)
        self.workers[name].wait_ready(time.monotonic() + self.start_timeout_s)

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.workers[name].proc.send_signal(sig)
        self.workers[name].proc.wait()

    def start(self) -> "LocalCluster":
        try:
            for w in self.cfg.workers:
                self.workers[w.name] = _Child(w.name, self._worker_cmd(w.name), self.echo)
            deadline = time.monotonic() + self.start_timeout_s
            for c in self.workers.values():
                c.wait_ready(deadline)
            cmd = [sys.executable, "-m", "cosine.control.serve", "--config", str(self.config_path), *self.serve_args]
            if self.log_level:
                cmd += ["--log-level", self.log_level.upper()]
            self.serve = _Child("serve", cmd, self.echo)
            self.serve.wait_ready(time.monotonic() + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def dead_child(self) -> tuple[str, int] | None:
        for c in [*([self.serve] if self.serve else []), *self.workers.values()]:
            if c.proc.poll() is not None:
                return c.name, c.proc.returncode
        return None

    def stop(self) -> None:
        # serve first (it releases requests on the workers), then the workers in parallel
        if self.serve is not None:
            self.serve.stop(self.stop_timeout_s)
        for c in self.workers.values():
            if c.proc.poll() is None:
                c.proc.terminate()
        for c in self.workers.values():
            c.stop(self.stop_timeout_s)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def up(config_path: str | Path, log_level: str | None = None) -> int:
    """Run the cluster in the foreground until Ctrl-C / SIGTERM or a child dies."""
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("signal %d: stopping the cluster", signum)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    cluster = LocalCluster(config_path, log_level=log_level, echo=True)
    try:
        cluster.start()
    except (ClusterError, cfgmod.ConfigError) as e:
        log.error("cosine up failed: %s", e)
        return 1
    print(f"cosine is up: clients connect to {cluster.endpoint}", flush=True)
    code = 0
    try:
        while not stop.wait(0.5):
            dead = cluster.dead_child()
            if dead:
                log.error("%s exited with code %s; stopping the cluster", *dead)
                code = 1
                break
    finally:
        cluster.stop()
        log.info("cosine stopped")
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine up", description="start all workers and cosine-serve from config.toml")
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--log-level", default=None)
    a = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(a.config, "cosine up")
    if cfg is None:
        return 2
    setup(a.log_level or cfg.logging.level, cfg.logging.file, "up")
    return up(a.config, a.log_level)


if __name__ == "__main__":
    sys.exit(main())
