"""`cosine up` and `cosine-serve` as real commands: start-up, clear errors, clean stop."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from cosine.client import Client

from conftest import wait_line, write_cluster_config




def test_serve_names_unreachable_worker(control_engines, tmp_path):
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"], {"good": control_engines["target"]})
    p = subprocess.run([sys.executable, "-m", "cosine.control.serve", "--config", str(cfg), "--connect-timeout", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "verifier-0" in p.stderr and "good" in p.stderr and "did not answer" in p.stderr


def test_up_serves_and_stops_when_a_child_dies(control_engines, tmp_path):
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"], {"good": control_engines["target"]})
    proc = subprocess.Popen([sys.executable, "-m", "cosine.control.cluster", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        line = wait_line(proc, "cosine is up: clients connect to tcp://", 120)
        endpoint = line.strip().rsplit(" ", 1)[-1]
        with Client(endpoint, timeout_s=30) as c:
            assert c.generate([5, 6, 7], max_tokens=5, mode="cosine").stats["tokens"] >= 1
        # find the drafter worker's pid through the process table and kill it
        out = subprocess.run(["pgrep", "-f", "--", f"--config {cfg} --name good"], capture_output=True, text=True).stdout
        pid = int(out.split()[0])
        subprocess.run(["kill", "-9", str(pid)])
        wait_line(proc, "good exited with code", 30)
        assert proc.wait(30) == 1
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            proc.wait(30)


def test_up_stops_cleanly_on_sigterm(control_engines, tmp_path):
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"], {})
    proc = subprocess.Popen([sys.executable, "-m", "cosine.control.cluster", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_line(proc, "cosine is up", 120)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        left = subprocess.run(["pgrep", "-f", "--", f"--config {cfg}"], capture_output=True, text=True).stdout.split()
        assert not left, f"children left running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
