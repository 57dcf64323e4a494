"""`cosine up` and `cosine-serve` as real commands: start-up, clear errors, supervision
(restarts, crash loops left down, serve crash loop stops the cluster), clean stop."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from cosine import config as cfgmod
from cosine.bench.chaos import UpProcess, reference_outputs
from cosine.bench.load import run_load
from cosine.client import Client

from conftest import wait_line, write_cluster_config



def test_serve_names_unreachable_worker(control_engines, tmp_path):
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"], {"good": control_engines["target"]})
    p = subprocess.run([sys.executable, "-m", "cosine.control.serve", "--config", str(cfg), "--connect-timeout", "1"],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 1
    assert "verifier-0" in p.stderr and "good" in p.stderr and "did not answer" in p.stderr


# restarts at 0.2, 0.4, 0.5 s; the fourth crash within a minute leaves the child down
FAST_SUPERVISOR = {"restart_backoff_s": 0.2, "restart_backoff_max_s": 0.5, "crash_loop_restarts": 3,
                   "crash_loop_window_s": 60.0}
PROMPTS = ["def fib(n):", "Es war einmal", "abc abc abc"]


def up_config(path: Path, target: Path, drafters: dict, supervisor: dict | None = None) -> Path:
    cfg = write_cluster_config(path, target, drafters, controller={"worker_timeout_s": 1.5})
    if supervisor:
        cfg.write_text(cfg.read_text() + "\n[supervisor]\n" + "".join(f"{k} = {v!r}\n" for k, v in supervisor.items()))
    return cfg


def left_behind(cfg: Path) -> list[str]:
    return subprocess.run(["pgrep", "-f", "--", f"--config {cfg}"], capture_output=True, text=True).stdout.split()


def lines_with(up: UpProcess, text: str) -> list[str]:
    return [x for x in list(up.lines) if text in x]


def test_up_restarts_a_killed_drafter_and_leaves_a_crash_loop_down(control_engines, tmp_path):
    """kill -9 of a drafter under `cosine up`: logged with its signal and restarted; when every
    restart fails (its engine is gone), it is left down after crash_loop_restarts restarts,
    loudly, while requests keep completing with output identical to autoregressive."""
    engine = shutil.copytree(control_engines["target"], tmp_path / "good-engine")
    cfg = up_config(tmp_path / "config.toml", control_engines["target"], {"good": engine, "lookup": ("lookup", None)},
                    FAST_SUPERVISOR)
    up = UpProcess(cfg)
    try:
        assert up.wait_for(lambda: bool(up.endpoint), 120), "\n".join(up.lines[-40:])
        ref = reference_outputs(up.endpoint, PROMPTS, 16, None)
        stop, out = threading.Event(), {}
        load = threading.Thread(target=lambda: out.update(run_load(
            up.endpoint, PROMPTS, 3, 300, 16, "cosine", timeout_s=60, reference=ref, stop=stop)))
        load.start()
        first = up.pids["good"]
        os.kill(first, signal.SIGKILL)
        assert up.wait_for(lambda: lines_with(up, "good is back (restart 1"), 60), "\n".join(up.lines[-40:])
        assert lines_with(up, f"drafter good (pid {first}) exited unexpectedly with signal SIGKILL")
        # now every start fails: its engine is gone, and the next kill starts a restart storm
        (engine / "manifest.json").rename(engine / "manifest.moved")
        os.kill(up.pids["good"], signal.SIGKILL)
        assert up.wait_for(lambda: lines_with(up, "drafter good CRASH-LOOPS"), 60), "\n".join(up.lines[-60:])
        t_down = time.monotonic()
        assert lines_with(up, "exited unexpectedly with code 3"), "\n".join(lines_with(up, "exited"))  # no engine
        with Client(up.endpoint, timeout_s=60) as c:
            done = 0
            while time.monotonic() - t_down < 2.0 or done < 3:  # past 4 x the longest back-off
                assert c.generate(PROMPTS[done % 3], max_tokens=16, mode="cosine",
                                  ignore_eos=True).token_ids == ref[PROMPTS[done % 3]]
                done += 1
            assert c.health()["drafters"] == {"good": False, "lookup": True}
        stop.set()
        load.join(120)
        r = out["requests"]
        assert r["errors_total"] == 0 and r["lost"] == 0 and out["determinism"]["mismatches"] == 0, out
        restarts = lines_with(up, "restarted drafter good (restart")
        # the first kill's restart counts too: all within one window
        assert len(restarts) == FAST_SUPERVISOR["crash_loop_restarts"], restarts  # the storm stopped
        assert not Path(f"/proc/{up.pids['good']}").exists() and up.proc.poll() is None
    finally:
        code, stop_s = up.stop()
    # the tail names a child that had to be killed and when serve began and ended its shutdown
    assert code == 0 and stop_s is not None and stop_s < 10, (code, stop_s, "\n".join(up.lines[-40:]))
    assert "restarts: {'good': 3}" in up.lines[-1]
    assert not left_behind(cfg)


def test_up_stops_when_serve_crash_loops(control_engines, tmp_path):
    """serve killed, and its endpoint taken by another process: each restarted serve fails to
    bind; after crash_loop_restarts restarts nothing can serve, so `cosine up` stops the
    cluster and exits 1."""
    cfg = up_config(tmp_path / "config.toml", control_engines["target"], {}, FAST_SUPERVISOR)
    port = int(cfgmod.load(cfg).controller.endpoint.rsplit(":", 1)[1])
    up = UpProcess(cfg)
    squatter = socket.socket()
    try:
        assert up.wait_for(lambda: bool(up.endpoint), 120), "\n".join(up.lines[-40:])
        os.kill(up.pids["serve"], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # the port is free once the killed serve is gone
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, "serve's port never became free"
                time.sleep(0.05)
        squatter.listen()
        up.proc.wait(120)
        assert up.stop()[0] == 1, "\n".join(up.lines[-60:])
        assert lines_with(up, "serve CRASH-LOOPS")
        assert lines_with(up, "serve crash-loops: nothing can serve; stopping the cluster")
        assert len(lines_with(up, "restarted serve (restart")) == FAST_SUPERVISOR["crash_loop_restarts"]
        assert not left_behind(cfg)
    finally:
        squatter.close()
        up.stop()


def test_up_stops_cleanly_on_sigterm(control_engines, tmp_path):
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"], {})
    proc = subprocess.Popen([sys.executable, "-m", "cosine.control.cluster", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        wait_line(proc, "cosine is up", 120)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert time.monotonic() - t0 < 10
        left = subprocess.run(["pgrep", "-f", "--", f"--config {cfg}"], capture_output=True, text=True).stdout.split()
        assert not left, f"children left running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()
