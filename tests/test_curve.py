"""CurveZMQ on every TCP socket (docs/security.md), through real processes and sockets:
keys from `cosine keys generate`, a tiny cluster with [security] curve = true, refused
peers and their log lines, start-up errors, and a loopback relay that sniffs the traffic."""

from __future__ import annotations

import json
import asyncio
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import zmq

from cosine import config
from cosine.client import AsyncClient, Client, ConnectionLost, Refused
from cosine.control.cluster import LocalCluster
from cosine.security import CurveKeys
from cosine.workers.client import WorkerClient, spawn_worker, stop_worker

from conftest import write_cluster_config

PROMPT = "attack at dawn the password is swordfish"  # characters of the tiny tokenizer
MODES = ("autoregressive", "cosine")


def _keys_generate(cwd: Path, *args: str) -> str:
    p = subprocess.run([sys.executable, "-m", "cosine.cli", "keys", "generate", *args], cwd=cwd,
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def _wait_log(child, *needles: str | tuple[str, ...], timeout_s: float = 30.0) -> str:
    """The first line of a cluster child's output holding every needle (a tuple: any of them)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in list(child.tail):
            if all(any(x in line for x in ((n,) if isinstance(n, str) else n)) for n in needles):
                return line
        time.sleep(0.05)
    raise AssertionError(f"no line with {needles} in {child.name}'s output:\n" + "\n".join(child.tail))


@pytest.fixture(scope="module")
def deployment(control_engines, tmp_path_factory):
    """Keys from the CLI (run next to config.toml, so its relative paths are used as printed),
    a second deployment's keys (an unlisted client, a wrong server key) and two configs."""
    root = tmp_path_factory.mktemp("curve")
    out = _keys_generate(root, "--dir", "keys", "--client", "client", "--client", "alice")
    block = out[out.index("[security]"):]
    assert 'client_secret_key = "keys/clients/client.key_secret"' in block
    _keys_generate(root, "--dir", "intruder")
    drafters = {"lookup": ("lookup", None)}
    limits = {"max_message_bytes": 65536}
    plain = write_cluster_config(root / "plain.toml", control_engines["target"], drafters, limits=limits)
    curve = write_cluster_config(root / "config.toml", control_engines["target"], drafters, limits=limits)
    curve.write_text(curve.read_text() + "\n" + block)
    server = root / "keys" / "server.key"
    return SimpleNamespace(
        root=root, plain=plain, curve=curve, block=block,
        alice=CurveKeys.load(root / "keys" / "clients" / "alice.key_secret", server),
        unlisted=CurveKeys.load(root / "intruder" / "clients" / "client.key_secret", server),
        wrong_server=CurveKeys.load(root / "keys" / "clients" / "alice.key_secret", root / "intruder" / "server.key"))


@pytest.fixture(scope="module")
def clusters(deployment):
    with LocalCluster(deployment.plain, serve_args=["--no-profile"]) as plain, \
            LocalCluster(deployment.curve, serve_args=["--no-profile"]) as curve:
        yield SimpleNamespace(plain=plain, curve=curve)


@pytest.fixture(scope="module")
def reference(clusters) -> dict[str, list[int]]:
    with Client(clusters.plain.endpoint, timeout_s=60) as c:
        return {m: c.generate(PROMPT, max_tokens=24, mode=m).token_ids for m in MODES}


class Relay:
    """A loopback TCP relay in front of ``port`` that records the bytes of each direction."""

    def __init__(self, port: int):
        self.port, self.up, self.down = port, bytearray(), bytearray()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.endpoint = f"tcp://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                a, _ = self.listener.accept()
            except OSError:
                return
            b = socket.create_connection(("127.0.0.1", self.port))
            threading.Thread(target=self._pump, args=(a, b, self.up), daemon=True).start()
            threading.Thread(target=self._pump, args=(b, a, self.down), daemon=True).start()

    @staticmethod
    def _pump(src: socket.socket, dst: socket.socket, record: bytearray) -> None:
        try:
            while data := src.recv(65536):
                record += data
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        self.listener.close()


def _port(endpoint: str) -> int:
    return int(endpoint.rsplit(":", 1)[1])


# ----- keys and config -----------------------------------------------------------------------

def test_keys_generate_layout_and_config(deployment):
    root = deployment.root
    for f in ("keys/server.key", "keys/server.key_secret", "keys/clients/alice.key_secret",
              "keys/authorized/client.key", "keys/authorized/alice.key"):
        assert (root / f).is_file(), f
    assert (root / "keys/server.key_secret").stat().st_mode & 0o077 == 0
    assert not (root / "keys/authorized/server.key").exists()
    # re-running keeps every key and adds the new client
    before = (root / "keys/server.key_secret").read_bytes()
    _keys_generate(root, "--dir", "keys", "--client", "bob")
    assert (root / "keys/server.key_secret").read_bytes() == before
    assert (root / "keys/authorized/bob.key").is_file()
    # relative paths in [security] resolve against the config file's directory
    sec = config.load(deployment.curve).security
    assert sec.curve and Path(sec.authorized_keys_dir) == root / "keys" / "authorized"
    assert Path(sec.client_secret_key) == root / "keys" / "clients" / "client.key_secret"


@pytest.mark.parametrize("old,new,pattern", [
    ('server_secret_key = "keys/server.key_secret"', 'server_secret_key = "keys/nope.key_secret"',
     r"line \d+: server_secret_key file .*keys/nope.key_secret not found; create keys with `cosine keys generate"),
    ('server_secret_key = "keys/server.key_secret"', 'server_secret_key = "keys/server.key"',
     r"line \d+: server_secret_key file .*server.key holds no secret key"),
    ('authorized_keys_dir = "keys/authorized"', 'authorized_keys_dir = "keys/clients/none"',
     r"line \d+: authorized_keys_dir .*keys/clients/none not found"),
    ('authorized_keys_dir = "keys/authorized"', 'authorized_keys_dir = "."',
     r"holds no client public keys \(\*\.key\), so every client would be refused"),
    ('client_secret_key = "keys/clients/client.key_secret"\n', "",
     r"line \d+: curve = true needs client_secret_key"),
])
def test_bad_security_config_is_a_clear_error(deployment, old, new, pattern):
    text = deployment.curve.read_text()
    assert old in text
    bad = deployment.root / "bad.toml"
    bad.write_text(text.replace(old, new))
    with pytest.raises(config.ConfigError, match=pattern):
        config.load(bad, check_engines=False)


def test_worker_and_serve_with_a_missing_key_file_fail_at_start_up(deployment):
    bad = deployment.root / "missing.toml"
    bad.write_text(deployment.curve.read_text().replace("keys/server.key_secret", "keys/gone.key_secret"))
    for cmd in (["cosine.workers.main", "--config", str(bad), "--name", "verifier-0"],
                ["cosine.control.serve", "--config", str(bad)]):
        p = subprocess.run([sys.executable, "-m", *cmd], capture_output=True, text=True, timeout=60)
        assert p.returncode == 2, p.stderr
        assert "server_secret_key file" in p.stderr and "gone.key_secret not found" in p.stderr, p.stderr
        assert "READY" not in p.stdout


def test_exposed_bind_without_curve_warns(control_engines, tmp_path):
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"], {"lookup": ("lookup", None)})
    cfg.write_text(cfg.read_text().replace('name = "lookup"\nmodel = "m-lookup"\nhost = "127.0.0.1"',
                                           'name = "lookup"\nmodel = "m-lookup"\nhost = "0.0.0.0"'))
    proc = spawn_worker(cfg, "lookup")
    try:
        deadline = time.monotonic() + 10
        while not any("WITHOUT CurveZMQ" in line for line in proc.output_tail) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert any("worker" in line and "0.0.0.0 WITHOUT CurveZMQ" in line for line in proc.output_tail), \
            "\n".join(proc.output_tail)
    finally:
        stop_worker(proc)


# ----- the cluster -----------------------------------------------------------------------------

def test_authorized_client_gets_the_same_greedy_output(deployment, clusters, reference, capsys):
    with Client(clusters.curve.endpoint, timeout_s=60, curve=deployment.alice) as c:
        assert {m: c.generate(PROMPT, max_tokens=24, mode=m).token_ids for m in MODES} == reference

    async def go() -> list[int]:
        async with AsyncClient(clusters.curve.endpoint, timeout_s=60, curve=deployment.alice) as ac:
            return (await ac.generate(PROMPT, max_tokens=24, mode="cosine")).token_ids

    assert asyncio.run(go()) == reference["cosine"]
    # `cosine generate` takes the endpoint and the client keys from config.toml
    from cosine.client import main

    assert main([PROMPT, "--config", str(deployment.curve), "--max-tokens", "24", "--mode", "cosine"]) == 0
    assert capsys.readouterr().out.strip()


def test_client_without_curve_is_refused_and_logged(clusters):
    # A raw peer that sends a ZMTP 3.0 greeting with the NULL mechanism (no CURVE) after a
    # moment: the log names its exact address. (Refusals are logged once per peer host and
    # reason every 30 s, so this one comes first.)
    with socket.create_connection(("127.0.0.1", _port(clusters.curve.endpoint))) as s:
        time.sleep(0.3)
        s.sendall(b"\xff" + b"\0" * 8 + b"\x7f" + b"\x03\x00" + b"NULL".ljust(20, b"\0") + b"\0" * 32)
        # (on a loaded machine the monitor may look up the peer after it closed: "unknown peer")
        line = _wait_log(clusters.curve.serve, "refused a connection from",
                         (f"127.0.0.1:{s.getsockname()[1]}: no CURVE", "an unknown peer"))
    assert "WARNING" in line and f"cosine-serve ({clusters.curve.endpoint})" in line
    with Client(clusters.curve.endpoint, timeout_s=10) as c:
        with pytest.raises(Refused, match=r"curve = true"):
            c.generate(PROMPT, max_tokens=4)
        with pytest.raises(Refused):  # and so is every later request
            c.health()

    async def go() -> None:
        async with AsyncClient(clusters.curve.endpoint, timeout_s=10) as ac:
            with pytest.raises(Refused, match=r"curve = true"):
                await ac.generate(PROMPT, max_tokens=4)

    asyncio.run(go())


def test_unlisted_key_is_refused_and_logged(deployment, clusters):
    with Client(clusters.curve.endpoint, timeout_s=10, curve=deployment.unlisted) as c:
        with pytest.raises(Refused, match="not in the server's authorized_keys_dir"):
            c.generate(PROMPT, max_tokens=4)
    line = _wait_log(clusters.curve.serve, "WARNING", "refused a connection from 127.0.0.1",
                     f"client public key {deployment.unlisted.public.decode()} is not in authorized_keys_dir")
    assert "cosine-serve" in line


def test_wrong_server_key_gets_no_service_and_is_logged(deployment, clusters):
    with Client(clusters.curve.endpoint, timeout_s=10, curve=deployment.wrong_server) as c:
        with pytest.raises(Refused, match="is the server public key right"):
            c.generate(PROMPT, max_tokens=4)
    _wait_log(clusters.curve.serve, "WARNING", "refused a connection", "wrong server public key")


def test_worker_refuses_a_wrong_key_and_serves_the_listed_one(deployment, clusters):
    cfg = config.load(deployment.curve)
    ep = cfg.worker("verifier-0").endpoint
    for keys in (deployment.unlisted, None):
        with WorkerClient(ep, timeout_s=4, curve=keys) as wc:
            with pytest.raises(TimeoutError, match="authorized_keys_dir" if keys else "curve = true"):
                wc.call("health")
    verifier = clusters.curve.workers["verifier-0"]
    _wait_log(verifier, "WARNING", "cosine-worker", f"client public key {deployment.unlisted.public.decode()}")
    # which end notices the mechanism mismatch first is a race: the peer may hang up first
    _wait_log(verifier, "WARNING", "cosine-worker", "refused a connection from 127.0.0.1:",
              ("no CURVE", "the peer hung up"))
    with WorkerClient(ep, timeout_s=10, curve=CurveKeys.from_config(cfg.security)) as wc:
        assert wc.call("health")[0]["ok"]


def test_traffic_is_encrypted_on_the_wire(deployment, clusters, reference):
    # control: through the same relay, a plain cluster's traffic shows the prompt
    relay = Relay(_port(clusters.plain.endpoint))
    try:
        with Client(relay.endpoint, timeout_s=60) as c:
            c.generate(PROMPT, max_tokens=8, mode="autoregressive")
        assert PROMPT.encode() in relay.up
    finally:
        relay.close()
    relay = Relay(_port(clusters.curve.endpoint))
    try:
        with Client(relay.endpoint, timeout_s=60, curve=deployment.alice) as c:
            r = c.generate(PROMPT, max_tokens=24, mode="autoregressive")
        assert r.token_ids == reference["autoregressive"]
        assert b"CURVE" in bytes(relay.up[:64]) and b"CURVE" in bytes(relay.down[:64])  # ZMTP greetings
        assert len(relay.up) > 200 and len(relay.down) > 200
        for needle in (PROMPT[:12], "swordfish", "generate", "max_tokens"):
            assert needle.encode() not in relay.up, needle
        for needle in (r.text, "token_ids", "finish_reason"):
            assert len(needle) < 6 or needle.encode() not in relay.down, needle
    finally:
        relay.close()


def test_max_message_bytes_is_enforced_on_the_curve_socket(deployment, clusters):
    with Client(clusters.curve.endpoint, timeout_s=10, curve=deployment.alice) as c:
        with pytest.raises(ConnectionLost):  # 400 kB of tokens > [limits] max_message_bytes = 64 kB: dropped
            c.generate([5] * 100_000, max_tokens=4)
    with Client(clusters.curve.endpoint, timeout_s=60, curve=deployment.alice) as c:
        assert c.health()["ok"]  # the server still serves
    assert clusters.curve.dead_child() is None


def test_socket_options(deployment):
    """secure_client sets the CURVE client options (the relay test shows they take effect)."""
    from cosine.security import secure_client

    ctx = zmq.Context.instance()
    with ctx.socket(zmq.DEALER) as s:
        secure_client(s, deployment.alice)
        assert s.getsockopt(zmq.MECHANISM) == zmq.CURVE and not s.curve_server
    with ctx.socket(zmq.DEALER) as s:
        secure_client(s, None)
        assert s.getsockopt(zmq.MECHANISM) == zmq.NULL
    assert deployment.alice.secret.decode() not in repr(deployment.alice)


def test_bench_clients_use_the_config_keys(deployment, clusters, tmp_path):
    """cosine-bench's clients take the [security] keys of --config: a load run against the
    CURVE cluster completes requests and loses none."""
    from cosine.bench.load import main as load_main

    rc = load_main(["--config", str(deployment.curve), "--clients", "2", "--duration", "3", "--max-tokens", "6",
                    "--out", str(tmp_path / "load")])
    res = json.loads((tmp_path / "load" / "load.json").read_text())
    assert rc == 0 and res["requests"]["completed"] > 0 and res["requests"]["errors_total"] == 0
