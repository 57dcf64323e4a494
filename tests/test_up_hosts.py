"""`cosine up --hosts`: which workers go over ssh, the exact ssh command, start-up failures
and stopping, without real ssh (the end-to-end launch path through network namespaces
is tests/test_netns.py)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest

from cosine.config import ConfigError
from cosine.control import cluster
from cosine.control.cluster import ClusterError, LocalCluster, Remote, _RemoteChild, is_local_host, parse_hosts

REMOTE_HOST = "192.0.2.11"  # TEST-NET-1: never an address of this machine


def _config(tmp_path: Path, target_engine: bool = True, verifier_host: str = "127.0.0.1") -> Path:
    """Verifier (target) at verifier_host, a neural drafter on REMOTE_HOST whose engine is not here."""
    eng = tmp_path / "target-engine"
    if target_engine:
        eng.mkdir()
        (eng / "manifest.json").write_text(json.dumps({"format": "cosine-engine"}))
    (tmp_path / "config.toml").write_text(f"""
[[models]]
name = "t"
role = "target"
engine = "{eng}"

[[models]]
name = "d"
role = "drafter"
engine = "/srv/cosine/engines/drafter"

[[workers]]
name = "verifier-0"
model = "t"
host = "{verifier_host}"
port = 5601

[[workers]]
name = "drafter-0"
model = "d"
host = "{REMOTE_HOST}"
port = 5602
""")
    return tmp_path / "config.toml"


def test_remote_command_defaults():
    w = cluster.cfgmod.WorkerConfig(name="drafter-0", model="d", host=REMOTE_HOST, port=5602)
    cmd = Remote().command(w, "/etc/cosine/config.toml")
    assert cmd == ["ssh", "-tt", "-o", "BatchMode=yes", "-o", "ServerAliveInterval=5", "-o", "ServerAliveCountMax=3",
                   REMOTE_HOST, "exec cosine-worker --config /etc/cosine/config.toml --name drafter-0"]


def test_remote_command_destinations_prefix_quoting():
    w = cluster.cfgmod.WorkerConfig(name="drafter-0", model="d", host=REMOTE_HOST, port=5602)
    r = Remote({REMOTE_HOST: "gpu@drafter1"}, ssh="/usr/bin/ssh", options=("-p", "2222"),
               config="/srv/my cosine/config.toml", prefix="cd /srv/cosine &&",
               worker_cmd="/srv/cosine/.venv/bin/cosine-worker")
    assert r.command(w, "/ignored.toml", log_level="debug") == [
        "/usr/bin/ssh", "-tt", "-p", "2222", "gpu@drafter1",
        "cd /srv/cosine && exec /srv/cosine/.venv/bin/cosine-worker --config '/srv/my cosine/config.toml' "
        "--name drafter-0 --log-level DEBUG"]
    # a worker name entry wins over its host's entry
    assert Remote({REMOTE_HOST: "a", "drafter-0": "b"}).destination(w) == "b"


def test_parse_hosts():
    assert parse_hosts([]) == {}
    assert parse_hosts(["10.0.0.11=gpu@d1", "drafter-1=d2"]) == {"10.0.0.11": "gpu@d1", "drafter-1": "d2"}
    for bad in ("10.0.0.11", "=x", "x="):
        with pytest.raises(ValueError, match="HOST=SSH_DESTINATION"):
            parse_hosts([bad])


def test_is_local_host():
    assert is_local_host("127.0.0.1") and is_local_host("localhost") and is_local_host("0.0.0.0")
    assert not is_local_host(REMOTE_HOST)
    assert not is_local_host("no-such-host.invalid")


def test_cluster_splits_local_and_remote_workers(tmp_path):
    cfg = _config(tmp_path)
    remote = Remote(config="/srv/cosine/config.toml")
    c = LocalCluster(cfg, remote=remote)  # the drafter's engine is on its host, not here: fine
    assert c.remote_workers == {"drafter-0"}
    assert c._worker_cmd("drafter-0")[:2] == ["ssh", "-tt"]
    assert c._worker_cmd("drafter-0")[-1] == "exec cosine-worker --config /srv/cosine/config.toml --name drafter-0"
    assert c._worker_cmd("verifier-0")[:3] == [sys.executable, "-m", "cosine.workers.main"]
    # without --hosts every worker is a local process (and every engine must be here)
    with pytest.raises(ConfigError, match="drafter"):
        LocalCluster(cfg)


def test_target_engine_must_be_here(tmp_path):
    """serve reads the target's manifest and tokenizer, even when the verifier is remote."""
    cfg = _config(tmp_path, target_engine=False, verifier_host=REMOTE_HOST.replace(".11", ".12"))
    with pytest.raises(ConfigError, match="model 't'"):
        LocalCluster(cfg, remote=Remote())


def test_ssh_failure_is_reported(tmp_path):
    cfg = _config(tmp_path, verifier_host="192.0.2.12")  # both workers remote: nothing local starts
    c = LocalCluster(cfg, remote=Remote(ssh="false"), start_timeout_s=20)
    t0 = time.monotonic()
    with pytest.raises(ClusterError, match=r"ssh exited with code 1 before the worker answered at tcp://192\.0\.2"):
        c.start()
    assert time.monotonic() - t0 < 10


def test_main_rejects_bad_hosts(tmp_path, capsys):
    cfg = _config(tmp_path)
    assert cluster.main(["--config", str(cfg), "--hosts", "nonsense"]) == 2
    assert "HOST=SSH_DESTINATION" in capsys.readouterr().err
    assert cluster.main(["--config", str(cfg), "--hosts", "10.9.9.9=x"]) == 2
    assert "neither a worker's host nor a worker's name" in capsys.readouterr().err


# A stand-in ssh session: prints, then waits; a Ctrl-C byte on stdin ends it (exit 130)
# unless IGNORE is set, like a remote worker that does not stop on SIGINT.
SESSION = r'''
import os, signal, sys
signal.signal(signal.SIGINT, signal.SIG_IGN)
print("remote says hi", flush=True)
while True:
    b = os.read(0, 1)
    if not b:
        sys.exit(0)
    if b == b"\x03" and not os.environ.get("IGNORE"):
        sys.exit(130)
'''


def test_remote_child_stops_with_ctrl_c(monkeypatch):
    monkeypatch.delenv("IGNORE", raising=False)
    ch = _RemoteChild("drafter-0", [sys.executable, "-c", SESSION], echo=False, endpoint="tcp://192.0.2.11:1")
    time.sleep(0.3)
    t0 = time.monotonic()
    assert ch.stop(10) == 130
    assert time.monotonic() - t0 < 5
    assert "remote says hi" in ch.tail


def test_remote_child_ends_the_session_when_ctrl_c_is_ignored(monkeypatch):
    monkeypatch.setenv("IGNORE", "1")
    ch = _RemoteChild("drafter-0", [sys.executable, "-c", SESSION], echo=False, endpoint="tcp://192.0.2.11:1")
    time.sleep(0.3)
    assert ch.stop(1) == -15  # Ctrl-C ignored: after the timeout, SIGTERM ends the ssh session


# A stand-in ssh whose session drops: it logs its argv, says READY as the worker would,
# then exits 255 as ssh does when the connection is lost.
DROPPING_SSH = r'''#!{python}
import json, sys, time
with open({log!r}, "a") as f:
    f.write(json.dumps(sys.argv[1:]) + "\n")
print("READY drafter-0 tcp://192.0.2.11:5602", flush=True)
time.sleep(0.3)
sys.exit(255)
'''


def test_supervisor_restarts_a_remote_worker_through_ssh_then_leaves_a_crash_loop_down(tmp_path, caplog):
    """`cosine up --hosts` supervises remote workers through their ssh sessions: a session
    that ends is restarted with the same ssh command, and a crash loop is left down."""
    from cosine.control.restart import RestartPolicy
    from cosine.control.supervisor import Supervisor

    log = tmp_path / "ssh.log"
    fake = tmp_path / "fake-ssh"
    fake.write_text(DROPPING_SSH.format(python=sys.executable, log=str(log)))
    fake.chmod(0o755)
    c = LocalCluster(_config(tmp_path), remote=Remote(ssh=str(fake)))
    c.workers["drafter-0"] = c._spawn("drafter-0")  # as start() does, without serve (no real worker here)
    sup = Supervisor(c, RestartPolicy(backoff_s=0.05, max_backoff_s=0.1, max_restarts=2, window_s=60))
    caplog.set_level("WARNING", logger="cosine.control.supervisor")
    deadline = time.monotonic() + 30
    while not sup.left_down():
        assert sup.tick(time.monotonic()) is None  # a drafter left down: serving goes on
        assert time.monotonic() < deadline, caplog.text
        time.sleep(0.02)
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert len(calls) == 3 and all(x == calls[0] for x in calls), calls  # first start + 2 restarts
    assert calls[0][-1] == "exec cosine-worker --config " + str(tmp_path / "config.toml") + " --name drafter-0"
    assert caplog.text.count("exited unexpectedly with code 255 (its ssh session ended)") == 2
    assert caplog.text.count("drafter-0 is back") == 2
    assert "drafter drafter-0 CRASH-LOOPS" in caplog.text and sup.summary() == {"drafter-0": 2}
