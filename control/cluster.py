"""`cosine up`: start every worker of config.toml and cosine-serve, and keep them running.

Workers start in parallel; serve starts once all are healthy (it waits for them itself
as well), then the HTTP gateway when config.toml has an ``[http]`` section. From then on
`cosine up` is a supervisor (control/supervisor.py): a child that exits unexpectedly is
restarted with back-off, a crash-looping one is left down while the rest keep serving.
Ctrl-C / SIGTERM stops everything: SIGTERM first, SIGKILL after a timeout.
`LocalCluster` is the same as a context manager, without supervision (tests, `make demo`).

With ``--hosts`` (``Remote``), a worker whose ``host`` is not an address of this machine
is started over SSH (``ssh -tt DEST 'exec cosine-worker --config PATH --name NAME'``) and
counts as ready once it answers ``health`` over TCP, like any worker serve talks to. It is
stopped by a Ctrl-C sent through the session's pseudo-terminal (the worker's graceful
SIGINT), then by ending the ssh session (sshd hangs up the terminal: SIGHUP). A session
that ends is a child that exited: it is restarted over ssh the same way. See
docs/deploy.md.
"""

from __future__ import annotations

import argparse
import collections
import logging
import os
import shlex
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cosine import config as cfgmod
from cosine.log import setup

log = logging.getLogger("cosine.control.cluster")


class ClusterError(RuntimeError):
    pass


SSH_OPTIONS = ("-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3")


@dataclass(frozen=True)
class Remote:
    """How `cosine up --hosts` starts the workers that live on other machines.

    ``destinations`` maps a worker's ``host`` (or its name) to the ssh destination
    (``user@machine``); a worker not in it is reached at its ``host`` itself.
    The remote command is ``{prefix} exec {worker_cmd} --config {config} --name NAME``
    run by the remote login shell, so ``prefix`` may set up the environment
    (``cd /srv/cosine &&``, ``CUDA_VISIBLE_DEVICES=1``) and ``exec`` makes the worker the
    session's process: it gets the pty's Ctrl-C and, when the session ends, its SIGHUP.
    """

    destinations: dict[str, str] = field(default_factory=dict)
    ssh: str = "ssh"
    options: tuple[str, ...] = SSH_OPTIONS
    config: str | None = None          # config.toml path on the remote hosts (default: the local path)
    prefix: str = ""
    worker_cmd: str = "cosine-worker"

    def destination(self, worker: cfgmod.WorkerConfig) -> str:
        return self.destinations.get(worker.name) or self.destinations.get(worker.host) or worker.host

    def command(self, worker: cfgmod.WorkerConfig, config_path: str | Path, log_level: str | None = None) -> list[str]:
        """The local argv that runs ``worker`` on its host."""
        remote = f"exec {self.worker_cmd} --config {shlex.quote(str(self.config or config_path))} " \
                 f"--name {shlex.quote(worker.name)}"
        if log_level:
            remote += f" --log-level {shlex.quote(log_level.upper())}"
        if self.prefix.strip():
            remote = f"{self.prefix.strip()} {remote}"
        # -tt: a pseudo-terminal on the remote side, so ending the session hangs up the worker
        return [self.ssh, "-tt", *self.options, self.destination(worker), remote]


def is_local_host(host: str) -> bool:
    """True when ``host`` is this machine: loopback, or an address a socket here can bind."""
    if cfgmod.is_loopback(host) or host in ("0.0.0.0", "::", "*", ""):
        return True
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except socket.gaierror:
        return False
    for family, _, _, _, addr in infos:
        try:
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.bind((addr[0], 0))
            return True
        except OSError:
            continue
    return False


def parse_hosts(items: list[str]) -> dict[str, str]:
    """``["10.0.0.11=gpu@drafter1", ...]`` -> {host or worker name: ssh destination}."""
    out = {}
    for it in items:
        key, sep, dest = it.partition("=")
        if not sep or not key or not dest:
            raise ValueError(f"--hosts entry {it!r}: write HOST=SSH_DESTINATION or WORKER=SSH_DESTINATION")
        out[key] = dest
    return out


def check_local_engines(cfg: cfgmod.Config, remote_workers: set[str]) -> None:
    """The engines this machine needs: the target's (serve reads its manifest and tokenizer)
    and those of the workers that run here. Remote workers' engines live on their hosts."""
    models = {cfg.target_model().name} | {w.model for w in cfg.workers if w.name not in remote_workers}
    for name in sorted(models):
        m = cfg.model(name)
        if m.kind != "lookup" and not (cfg.engine_dir(m) / "manifest.json").is_file():
            raise cfgmod.ConfigError(f"{cfg.path}: engine for model {m.name!r} not found at {cfg.engine_dir(m)} "
                                     f"(no manifest.json); this machine needs it (the target's, or a local worker's)")


class _Child:
    """A subprocess whose output is pumped (a full pipe would block it) and echoed."""

    def __init__(self, name: str, cmd: list[str], echo: bool, stdin: Any = None):
        self.name, self.cmd = name, cmd
        self.tail: collections.deque[str] = collections.deque(maxlen=200)
        self.ready = threading.Event()
        self.started = time.monotonic()
        self.proc = subprocess.Popen(cmd, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                     bufsize=1,
                                     start_new_session=True)  # Ctrl-C reaches us only; we stop children in order
        for stream, watch in ((self.proc.stdout, True), (self.proc.stderr, False)):
            threading.Thread(target=self._pump, args=(stream, watch, echo), daemon=True).start()

    def _pump(self, stream: Any, watch: bool, echo: bool) -> None:
        for line in stream:
            line = line.rstrip("\r\n")  # a remote pty ends lines with \r\n
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


class _RemoteChild(_Child):
    """A worker on another host, run by an ``ssh -tt`` session."""

    def __init__(self, name: str, cmd: list[str], echo: bool, endpoint: str, curve: Any = None):
        super().__init__(name, cmd, echo, stdin=subprocess.PIPE)
        self.endpoint = endpoint
        self.curve = curve  # CurveKeys of [security] (None: plain), as serve connects

    def wait_ready(self, deadline: float) -> None:
        """Ready when it answers health over TCP (or prints READY through ssh)."""
        from cosine.workers.client import WorkerClient, WorkerError

        with WorkerClient(self.endpoint, timeout_s=1.0, curve=self.curve) as c:
            while not self.ready.is_set():
                if self.proc.poll() is not None:
                    time.sleep(0.1)
                    raise ClusterError(f"{self.name}: ssh exited with code {self.proc.returncode} before the worker "
                                       f"answered at {self.endpoint} ({' '.join(self.cmd)}):\n"
                                       + "\n".join(list(self.tail)[-30:]))
                if time.monotonic() > deadline:
                    raise ClusterError(f"{self.name} did not answer health at {self.endpoint} in time "
                                       f"({' '.join(self.cmd)}):\n" + "\n".join(list(self.tail)[-30:]))
                try:
                    c.call("health", {}, timeout_s=0.5)
                    self.ready.set()
                except (TimeoutError, WorkerError, OSError):
                    self.ready.wait(0.2)

    def interrupt(self) -> None:
        """Ctrl-C through the remote pty: the worker's graceful SIGINT shutdown."""
        if self.proc.poll() is None and self.proc.stdin is not None:
            try:
                self.proc.stdin.write("\x03")
                self.proc.stdin.flush()
            except (BrokenPipeError, OSError, ValueError):
                pass

    def stop(self, timeout_s: float) -> int | None:
        if self.proc.poll() is None:
            self.interrupt()
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                # ending the session hangs up the remote terminal (SIGHUP to the worker)
                log.warning("%s did not stop on Ctrl-C in %.0f s; ending its ssh session", self.name, timeout_s)
                return super().stop(5.0)
        return self.proc.returncode


GATEWAY_MODULE = "cosine.gateway"
# A restarted serve waits this long for drafters (verifiers: --connect-timeout): one that is
# restarting or left down must not hold up serving; serve's probes admit it once it answers.
SERVE_DRAFTER_WAIT_S = 5.0


class LocalCluster:
    """All workers + cosine-serve (+ the HTTP gateway) of one config as subprocesses.

        with LocalCluster("config.toml") as c:
            Client(c.endpoint).generate(...)
    """

    def __init__(self, config_path: str | Path, log_level: str | None = None, echo: bool = False,
                 start_timeout_s: float = 120.0, stop_timeout_s: float = 10.0, serve_args: list[str] | None = None,
                 remote: Remote | None = None, defer: tuple[str, ...] = ()):
        self.config_path = Path(config_path).resolve()
        self.defer = set(defer)  # workers start() leaves out (start them later: start_worker)
        self.cfg = cfgmod.load(self.config_path, check_engines=remote is None)
        self.remote = remote
        # with --hosts, the workers whose host is not this machine run over ssh
        self.remote_workers = {w.name for w in self.cfg.workers if remote is not None and not is_local_host(w.host)}
        if remote is not None:
            check_local_engines(self.cfg, self.remote_workers)
        self.log_level = log_level
        self.echo = echo
        self.start_timeout_s = start_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.serve_args = serve_args or []
        self.workers: dict[str, _Child] = {}
        self.serve: _Child | None = None
        self.gateway: _Child | None = None
        # set by another engineer's [http] section (Config.http); None or absent: no gateway
        self.has_gateway = getattr(self.cfg, "http", None) is not None
        self.endpoint = self.cfg.controller.endpoint
        self.verifiers = {w.name for w in self.cfg.verifier_workers()}

    def _worker_cmd(self, name: str) -> list[str]:
        if name in self.remote_workers:
            assert self.remote is not None
            return self.remote.command(self.cfg.worker(name), self.config_path, self.log_level)
        cmd = [sys.executable, "-m", "cosine.workers.main", "--config", str(self.config_path), "--name", name]
        return cmd + (["--log-level", self.log_level.upper()] if self.log_level else [])

    def _spawn(self, name: str) -> _Child:
        cmd = self._worker_cmd(name)
        if name in self.remote_workers:
            log.info("starting %s on %s over ssh: %s", name, self.cfg.worker(name).host, shlex.join(cmd))
            from cosine.security import CurveKeys

            child: _Child = _RemoteChild(name, cmd, self.echo, self.cfg.worker(name).endpoint,
                                         CurveKeys.from_config(self.cfg.security))
        else:
            child = _Child(name, cmd, self.echo)
        log.info("%s started: pid %d", name, child.proc.pid)
        return child

    def _spawn_serve(self) -> _Child:
        cmd = [sys.executable, "-m", "cosine.control.serve", "--config", str(self.config_path),
               "--drafter-timeout", f"{SERVE_DRAFTER_WAIT_S:g}", *self.serve_args]
        if self.log_level:
            cmd += ["--log-level", self.log_level.upper()]
        self.serve = _Child("serve", cmd, self.echo)
        log.info("serve started: pid %d", self.serve.proc.pid)
        return self.serve

    def _spawn_gateway(self) -> _Child:
        self.gateway = _Child("gateway", [sys.executable, "-m", GATEWAY_MODULE, "--config", str(self.config_path)],
                              self.echo)
        log.info("gateway started: pid %d", self.gateway.proc.pid)
        return self.gateway

    def start_worker(self, name: str) -> None:
        """(Re)start one worker and wait until it serves."""
        self.workers[name] = self._spawn(name)
        self.workers[name].wait_ready(time.monotonic() + self.start_timeout_s)

    def kill_worker(self, name: str, sig: int = signal.SIGKILL) -> None:
        self.workers[name].proc.send_signal(sig)
        self.workers[name].proc.wait()

    def start(self) -> "LocalCluster":
        try:
            for w in self.cfg.workers:
                if w.name not in self.defer:
                    self.workers[w.name] = self._spawn(w.name)
            deadline = time.monotonic() + self.start_timeout_s
            for c in self.workers.values():
                c.wait_ready(deadline)
            self._spawn_serve().wait_ready(time.monotonic() + self.start_timeout_s)
            if self.has_gateway:  # ready means READY printed: its port is bound, so clients can start
                self._spawn_gateway().wait_ready(time.monotonic() + self.start_timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    # -- what the supervisor needs ------------------------------------------------------
    def children(self) -> dict[str, _Child]:
        """Every child by name: the workers, "serve" and "gateway" (once started)."""
        out = dict(self.workers)
        out.update({c.name: c for c in (self.serve, self.gateway) if c is not None})
        return out

    def role(self, name: str) -> str:
        """"serve", "gateway", "verifier" or "drafter"."""
        if name in ("serve", "gateway"):
            return name
        return "verifier" if name in self.verifiers else "drafter"

    def respawn(self, name: str) -> _Child:
        """Start a new instance of child ``name`` without waiting for it (the supervisor's
        loop watches it); a remote worker's readiness is polled in the background."""
        if name == "serve":
            return self._spawn_serve()
        if name == "gateway":
            return self._spawn_gateway()
        child = self.workers[name] = self._spawn(name)
        if isinstance(child, _RemoteChild):
            threading.Thread(target=_await_ready, args=(child, time.monotonic() + self.start_timeout_s),
                             name=f"ready-{name}", daemon=True).start()
        return child

    def dead_child(self) -> tuple[str, int] | None:
        for c in self.children().values():
            if c.proc.poll() is not None:
                return c.name, c.proc.returncode
        return None

    def stop(self) -> None:
        # the gateway and serve first (serve releases requests on the workers), then the
        # workers in parallel
        for front in (self.gateway, self.serve):
            if front is not None:
                front.stop(self.stop_timeout_s)
        for c in self.workers.values():
            if isinstance(c, _RemoteChild):
                c.interrupt()
            elif c.proc.poll() is None:
                c.proc.terminate()
        for c in self.workers.values():
            c.stop(self.stop_timeout_s)

    def __enter__(self) -> "LocalCluster":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()


def _await_ready(child: _Child, deadline: float) -> None:
    try:
        child.wait_ready(deadline)
    except ClusterError as e:  # the supervisor sees the exit or the missing readiness itself
        log.debug("%s", e)


def up(config_path: str | Path, log_level: str | None = None, remote: Remote | None = None) -> int:
    """Run the cluster in the foreground until Ctrl-C / SIGTERM, restarting what dies;
    exits 1 when serving has become impossible (serve or every verifier crash-loops)."""
    from cosine.control.supervisor import Supervisor

    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("%s: stopping the cluster", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    try:
        cluster = LocalCluster(config_path, log_level=log_level, echo=True, remote=remote)
        if remote is not None:
            for w in cluster.cfg.workers:
                where = f"over ssh on {remote.destination(w)}" if w.name in cluster.remote_workers else "here"
                log.info("worker %s (%s) runs %s", w.name, w.endpoint, where)
        cluster.start()
    except (ClusterError, cfgmod.ConfigError) as e:
        log.error("cosine up failed: %s", e)
        return 1
    supervisor = Supervisor(cluster)
    print(f"cosine is up: clients connect to {cluster.endpoint}", flush=True)
    code = 0
    try:
        while not stop.wait(0.2):
            fatal = supervisor.tick(time.monotonic())
            if fatal:
                log.error("%s: nothing can serve; stopping the cluster", fatal)
                code = 1
                break
    finally:
        cluster.stop()
        log.info("cosine stopped; restarts: %s", supervisor.summary() or "none")
    return code


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine up", description="start all workers and cosine-serve from config.toml "
                                 "and keep them running: a child that exits is restarted with back-off, one that "
                                 "crash-loops is left down ([supervisor]); Ctrl-C or SIGTERM stops everything")
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--log-level", default=None)
    ap.add_argument("--hosts", nargs="*", metavar="HOST=DEST", default=None,
                    help="start every worker whose host is not this machine over ssh; optional HOST=DEST or "
                         "WORKER=DEST entries give the ssh destination (default: the worker's host)")
    ap.add_argument("--ssh", default=os.environ.get("COSINE_SSH", "ssh"),
                    help="ssh executable (default: $COSINE_SSH or ssh)")
    ap.add_argument("--ssh-option", action="append", default=None, metavar="OPT",
                    help="ssh option, repeatable (--ssh-option=-p2222); replaces the defaults "
                         + " ".join(SSH_OPTIONS))
    ap.add_argument("--remote-config", default=None,
                    help="config.toml path on the remote hosts (default: the same path as here)")
    ap.add_argument("--remote-prefix", default="",
                    help="shell text before the remote command, e.g. 'cd /srv/cosine &&'")
    ap.add_argument("--remote-worker", default="cosine-worker",
                    help="the worker command on the remote hosts, e.g. /srv/cosine/.venv/bin/cosine-worker")
    a = ap.parse_args(argv)
    remote = None
    if a.hosts is not None:
        try:
            dests = parse_hosts(a.hosts)
        except ValueError as e:
            print(f"cosine up: {e}", file=sys.stderr)
            return 2
        remote = Remote(dests, ssh=a.ssh, options=tuple(a.ssh_option) if a.ssh_option is not None else SSH_OPTIONS,
                        config=a.remote_config, prefix=a.remote_prefix, worker_cmd=a.remote_worker)
    cfg = cfgmod.load_for_cli(a.config, "cosine up", check_engines=remote is None)
    if cfg is None:
        return 2
    if remote is not None:
        unknown = sorted(set(remote.destinations) - {w.host for w in cfg.workers} - {w.name for w in cfg.workers})
        if unknown:
            print(f"cosine up: --hosts names {unknown}, which are neither a worker's host nor a worker's name "
                  f"in {cfg.path}", file=sys.stderr)
            return 2
    setup(a.log_level or cfg.logging.level, cfg.logging.file, "up")
    return up(a.config, a.log_level, remote)


if __name__ == "__main__":
    sys.exit(main())
