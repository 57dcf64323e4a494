"""`cosine-http` as a child process (the benchmark and the tests start it next to a
LocalCluster, as `cosine up` does): started only when nothing answers at its address yet."""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path


def answers(base: str) -> bool:
    """Does an HTTP server answer /health at ``base`` (http://host:port)?"""
    try:
        with urllib.request.urlopen(base + "/health", timeout=2):
            return True
    except urllib.error.HTTPError:
        return True  # it answers (503 while serve starts)
    except OSError:
        return False


class GatewayProcess:
    """``with GatewayProcess(config, base):`` runs `python -m cosine.gateway --config`
    until the block ends (SIGTERM, then SIGKILL); reuses a gateway already at ``base``."""

    def __init__(self, config_path: str | Path, base: str, start_timeout_s: float = 60.0):
        self.config_path, self.base, self.start_timeout_s = Path(config_path), base, start_timeout_s
        self.proc: subprocess.Popen | None = None
        self.output: list[str] = []

    def start(self) -> "GatewayProcess":
        if answers(self.base):
            return self
        self.proc = subprocess.Popen([sys.executable, "-m", "cosine.gateway", "--config", str(self.config_path)],
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        ready = threading.Event()

        def pump() -> None:  # keep reading: a full pipe would block the gateway
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.output.append(line)
                if "READY cosine-http" in line:
                    ready.set()

        threading.Thread(target=pump, daemon=True).start()
        end = time.monotonic() + self.start_timeout_s
        while not ready.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > end:
                self.stop()
                raise RuntimeError("cosine-http did not start:\n" + "".join(self.output[-40:]))
        return self

    def stop(self, timeout_s: float = 15.0) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def __enter__(self) -> "GatewayProcess":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
