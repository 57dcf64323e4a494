"""Multi-host deployment on one machine: every "host" is a Linux network namespace.

    head  10.77.0.1  (bridge br0)   cosine-serve, verifier-0 (tiny target), the client
    d0    10.77.0.11 (veth -> br0)  drafter "good": a tiny neural drafter (the target's engine)
    d1    10.77.0.12 (veth -> br0)  drafter "lookup": the weight-free prompt-lookup drafter

Every byte between serve and the drafters crosses a veth link as real TCP between
namespace addresses; nothing listens on a shared loopback (checked). The tests:

  * `cosine up --hosts` starts the drafters "over ssh" (an ssh stand-in that runs the
    remote command inside the destination's namespace), serves, and stops them all on SIGTERM;
  * greedy outputs through the 3-host deployment equal `autoregressive` (lossless);
  * a drafter's link goes down under load until serve marks it dead: requests finish identical to
    autoregressive, the drafter is marked dead, re-admitted after the link is back and
    drafts again; no worker holds a request afterwards (no leaked cache);
  * a drafter worker SIGKILLed and restarted in its namespace rejoins without restarting serve.

Needs root (`ip netns add`); otherwise the whole module is skipped, saying why.
The serve <-> verifier link is not cut: both live in the head namespace (docs/deploy.md).
"""

from __future__ import annotations

import json
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from cosine.control.cluster import _Child

from conftest import wait_line

PID = os.getpid()
NS = {h: f"cos-{PID}-{h}" for h in ("head", "d0", "d1")}
ADDR = {"head": "10.77.0.1", "d0": "10.77.0.11", "d1": "10.77.0.12"}
LINK = {"d0": "vd0", "d1": "vd1"}            # head-side veth of each drafter host
WORKER_HOST = {"verifier-0": "head", "good": "d0", "lookup": "d1"}
BIN = Path(sys.executable).parent
WORKER_TIMEOUT_S = 1.5
PROMPTS = [[5, 17, 12, 8, 9], [7, 7, 21, 30, 4, 11], [40, 3, 9, 9, 14], [12, 25, 33, 6, 2, 19, 8]]
MAX_TOKENS = 96


class NetnsError(RuntimeError):
    pass


def ip(*args: str) -> str:
    p = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if p.returncode:
        raise NetnsError(f"`ip {' '.join(args)}` failed: {(p.stderr or p.stdout).strip()}")
    return p.stdout


def _exe(name: str, module: str) -> list[str]:
    """The venv's console script, else ``python -m module``."""
    return [str(BIN / name)] if (BIN / name).is_file() else [sys.executable, "-m", module]


def _kill_namespace_procs(ns: str) -> None:
    """Safety net: SIGKILL what is still running inside one of our namespaces (only our processes)."""
    try:
        pids = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _delete_namespaces(names: list[str]) -> None:
    for ns in names:
        _kill_namespace_procs(ns)
    for ns in names:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)


@pytest.fixture(scope="module")
def hosts():
    """Three namespaces joined by veth pairs to a bridge in the head namespace."""
    if not sys.platform.startswith("linux"):
        pytest.skip("network namespaces are Linux only")
    if os.geteuid() != 0:
        pytest.skip(f"network namespaces need root (`ip netns add`); running as uid {os.geteuid()}")
    if shutil.which("ip") is None:
        pytest.skip("the `ip` command (iproute2) is not installed")
    made: list[str] = []
    try:
        for ns in NS.values():
            ip("netns", "add", ns)
            made.append(ns)
        ip("netns", "exec", NS["head"], "true")  # needs to mount /sys: refused in some containers
    except NetnsError as e:
        _delete_namespaces(made)
        pytest.skip(f"network namespaces are not permitted here: {e}")
    try:
        head = NS["head"]
        for ns in NS.values():
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", head, "link", "add", "br0", "type", "bridge")
        ip("-n", head, "addr", "add", f"{ADDR['head']}/24", "dev", "br0")
        ip("-n", head, "link", "set", "br0", "up")
        for h, veth in LINK.items():
            ip("-n", head, "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns", NS[h])
            ip("-n", head, "link", "set", veth, "master", "br0", "up")
            ip("-n", NS[h], "addr", "add", f"{ADDR[h]}/24", "dev", "eth0")
            ip("-n", NS[h], "link", "set", "eth0", "up")
    except NetnsError as e:
        _delete_namespaces(made)
        pytest.skip(f"namespaces work but cannot be wired with veth pairs and a bridge: {e}")
    try:
        yield NS
    finally:
        _delete_namespaces(made)


def write_config(path: Path, engine: Path, base_port: int) -> Path:
    """One deployment over the three hosts: verifier on head, a drafter on each drafter host."""
    text = f"""# 3 hosts: head (serve + verifier), d0 (neural drafter), d1 (prompt lookup)
[logging]
level = "INFO"

[security]
curve = false               # plain TCP on the bridge (workers warn that they bind a non-loopback address)

[limits]
max_prompt_tokens = 96
max_new_tokens = 256

[[models]]
name = "target"
role = "target"
engine = "{engine}"

[[models]]
name = "drafter"            # the target's own engine: a drafter whose tokens are accepted
role = "drafter"
engine = "{engine}"

[[models]]
name = "prompt-lookup"
role = "drafter"
kind = "lookup"

[[workers]]
name = "verifier-0"
model = "target"
host = "{ADDR['head']}"
port = {base_port + 1}
threads = 1
max_batch = 64
idle_timeout_s = 600.0

[[workers]]
name = "good"
model = "drafter"
host = "{ADDR['d0']}"
port = {base_port + 2}
threads = 1
max_batch = 64
idle_timeout_s = 600.0

[[workers]]
name = "lookup"
model = "prompt-lookup"
host = "{ADDR['d1']}"
port = {base_port + 3}
max_batch = 64
idle_timeout_s = 600.0

[controller]
endpoint = "tcp://{ADDR['head']}:{base_port}"
mode = "cosine"
worker_timeout_s = {WORKER_TIMEOUT_S}

[controller.speculation]
disable_below_ratio = 0.0   # tiny engines draft about as slowly as they verify: keep speculating

[controller.routing]
engage_by_cost = false      # likewise: always engage the model drafter
"""
    path.write_text(text)
    return path


# ----- a client inside the head namespace ---------------------------------------------------

HELPER = r'''
"""JSON-lines RPC to cosine.client, run inside the head namespace. One thread (and one
Client) per command; replies {"id", "result"} or {"id", "exception"}."""
import json, socket, sys, threading, time, traceback
from cosine.client import Client, CosineError

endpoint = sys.argv[1]
lock = threading.Lock()


def out(obj):
    with lock:
        sys.stdout.write(json.dumps(obj) + "\n")
        sys.stdout.flush()


def generate(c, prompt, max_tokens, mode):
    t0 = time.monotonic()
    try:
        r = c.generate(prompt, max_tokens=max_tokens, mode=mode, ignore_eos=True, timeout_s=60)
        return {"ok": True, "token_ids": r.token_ids, "stats": r.stats, "t0": t0, "t1": time.monotonic()}
    except CosineError as e:
        return {"ok": False, "code": e.code, "message": e.message, "t0": t0, "t1": time.monotonic()}


def load(a):
    """`threads` clients generate the prompts round-robin until `duration_s` has passed."""
    results, stop_at = [], time.monotonic() + a["duration_s"]

    def worker(k):
        with Client(endpoint, timeout_s=60) as c:
            i = k
            while time.monotonic() < stop_at:
                p = i % len(a["prompts"])
                res = generate(c, a["prompts"][p], a["max_tokens"], a["mode"])
                res.update(prompt=p, thread=k)
                results.append(res)
                i += a["threads"]

    ts = [threading.Thread(target=worker, args=(k,)) for k in range(a["threads"])]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    return sorted(results, key=lambda r: r["t0"])


def run(cmd):
    try:
        op = cmd["op"]
        if op == "tcp":
            try:
                socket.create_connection((cmd["host"], cmd["port"]), timeout=2).close()
                res = {"ok": True}
            except OSError as e:
                res = {"ok": False, "error": str(e)}
        elif op == "load":
            res = load(cmd)
        else:
            with Client(endpoint, timeout_s=cmd.get("timeout_s", 60)) as c:
                if op == "generate":
                    res = generate(c, cmd["prompt"], cmd["max_tokens"], cmd.get("mode"))
                elif op == "health":
                    res = c.health()
                elif op == "stats":
                    res = c.stats()
                else:
                    raise ValueError(f"unknown op {op}")
        out({"id": cmd["id"], "result": res})
    except BaseException:
        out({"id": cmd["id"], "exception": traceback.format_exc()})


print("READY helper", flush=True)
for line in sys.stdin:
    threading.Thread(target=run, args=(json.loads(line),), daemon=True).start()
'''


class NsClient:
    """Talks to cosine-serve from inside the head namespace through the helper process."""

    def __init__(self, head: str, endpoint: str, workdir: Path):
        script = workdir / "netns_client.py"
        script.write_text(HELPER)
        self.proc = subprocess.Popen(["ip", "netns", "exec", head, sys.executable, str(script), endpoint],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, bufsize=1)
        self.pending: dict[int, queue.Queue] = {}
        self.lock = threading.Lock()
        self.next_id = 0
        self.stderr: list[str] = []
        ready = queue.Queue()
        threading.Thread(target=self._read, args=(ready,), daemon=True).start()
        threading.Thread(target=lambda: self.stderr.extend(self.proc.stderr), daemon=True).start()
        try:
            ready.get(timeout=60)
        except queue.Empty:
            self.close()
            raise AssertionError("client helper did not start:\n" + "".join(self.stderr[-30:]))

    def _read(self, ready: queue.Queue) -> None:
        for line in self.proc.stdout:
            if line.startswith("READY"):
                ready.put(True)
                continue
            msg = json.loads(line)
            with self.lock:
                q = self.pending.pop(msg["id"], None)
            if q is not None:
                q.put(msg)

    def submit(self, op: str, **kw: Any) -> queue.Queue:
        q: queue.Queue = queue.Queue()
        with self.lock:
            self.next_id += 1
            self.pending[self.next_id] = q
            self.proc.stdin.write(json.dumps({"id": self.next_id, "op": op, **kw}) + "\n")
            self.proc.stdin.flush()
        return q

    @staticmethod
    def wait(q: queue.Queue, timeout_s: float = 90.0) -> Any:
        msg = q.get(timeout=timeout_s)
        if "exception" in msg:
            raise AssertionError("client helper raised:\n" + msg["exception"])
        return msg["result"]

    def call(self, op: str, timeout_s: float = 90.0, **kw: Any) -> Any:
        return self.wait(self.submit(op, **kw), timeout_s)

    def generate(self, prompt: list[int], mode: str, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
        return self.call("generate", prompt=prompt, max_tokens=max_tokens, mode=mode)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(10)


def _held(stats: dict[str, Any]) -> dict[str, Any]:
    """requests_held of every worker, from serve's `stats` (an error string for a dead one)."""
    return {n: w.get("requests_held", w.get("error")) for n, w in stats["workers"].items()}


def _wait_no_requests_held(client: NsClient, timeout_s: float = 10.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while True:
        st = client.call("stats")
        held = _held(st)
        if all(v == 0 for v in held.values()) and st["active_requests"] == 0:
            return held
        if time.monotonic() > deadline:
            return held
        time.sleep(0.3)


def _wait_readmitted(client: NsClient, name: str, timeout_s: float = 30.0) -> float:
    """The time at which serve's health shows ``name`` alive; small requests drive the
    rounds in which serve probes dead drafters."""
    t0 = time.monotonic()
    while not client.call("health")["drafters"][name]:
        assert time.monotonic() - t0 < timeout_s, f"drafter {name} was not re-admitted within {timeout_s} s"
        client.generate(PROMPTS[0], "cosine", max_tokens=4)
        time.sleep(0.2)
    return time.monotonic()


def _draft_steps(stats: dict[str, Any], name: str) -> int:
    return int(stats["workers"][name].get("steps", {}).get("draft", 0))


# ----- a deployment started by hand: cosine-worker per host, cosine-serve on the head ------

class Deployment:
    def __init__(self, hosts: dict[str, str], config: Path, workdir: Path):
        self.hosts, self.config = hosts, config
        self.children: dict[str, _Child] = {}
        self.client: NsClient | None = None
        self.workdir = workdir

    def spawn(self, name: str) -> _Child:
        ns = self.hosts[WORKER_HOST[name]]
        cmd = ["ip", "netns", "exec", ns, *_exe("cosine-worker", "cosine.workers.main"),
               "--config", str(self.config), "--name", name]
        self.children[name] = _Child(name, cmd, echo=False)  # `ip netns exec` execs: the pid is the worker's
        return self.children[name]

    def start(self) -> "Deployment":
        for name in WORKER_HOST:
            self.spawn(name)
        deadline = time.monotonic() + 120
        for c in list(self.children.values()):
            c.wait_ready(deadline)
        self.children["serve"] = _Child("serve", ["ip", "netns", "exec", self.hosts["head"],
                                                  *_exe("cosine-serve", "cosine.control.serve"),
                                                  "--config", str(self.config)], echo=False)
        self.children["serve"].wait_ready(time.monotonic() + 120)
        self.client = NsClient(self.hosts["head"], f"tcp://{ADDR['head']}:5600", self.workdir)
        return self

    def serve_log(self, needle: str) -> list[str]:
        return [line for line in self.children["serve"].tail if needle in line]

    def stop(self) -> None:
        if self.client is not None:
            self.client.close()
        if "serve" in self.children:
            self.children["serve"].stop(15)
        for c in self.children.values():
            c.stop(15)


@pytest.fixture(scope="module")
def deployment(hosts, control_engines, tmp_path_factory):
    work = tmp_path_factory.mktemp("netns")
    cfg = write_config(work / "config.toml", control_engines["target"], 5600)
    d = Deployment(hosts, cfg, work)
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture(scope="module")
def reference(deployment) -> list[list[int]]:
    """`autoregressive` outputs of PROMPTS: what every other mode must reproduce."""
    c = deployment.client
    outs = [c.submit("generate", prompt=p, max_tokens=MAX_TOKENS, mode="autoregressive") for p in PROMPTS]
    res = [c.wait(q) for q in outs]
    assert all(r["ok"] for r in res), res
    return [r["token_ids"] for r in res]


# ----- the tests ---------------------------------------------------------------------------

FAKE_SSH = r'''#!{python}
"""ssh stand-in for `cosine up --hosts`: `ssh [-tt] [-o OPT]... DEST COMMAND` runs COMMAND
with sh inside network namespace DEST, as sshd would on that host. Like a session with
`-tt`: a Ctrl-C byte on stdin interrupts the command (SIGINT), and ending the session
(SIGTERM / SIGHUP to this process) hangs the command up (SIGHUP)."""
import json, os, signal, subprocess, sys, threading

args = sys.argv[1:]
while args and args[0].startswith("-"):
    if args.pop(0) in ("-o", "-p", "-i", "-l", "-F", "-J"):
        args.pop(0)
dest, command = args[0], " ".join(args[1:])
with open(os.environ["FAKE_SSH_LOG"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "dest": dest, "command": command}}) + "\n")
child = subprocess.Popen(["ip", "netns", "exec", dest, "sh", "-c", command], stdin=subprocess.DEVNULL)
signal.signal(signal.SIGTERM, lambda *_: child.send_signal(signal.SIGHUP))
signal.signal(signal.SIGHUP, lambda *_: child.send_signal(signal.SIGHUP))


def pty():
    while True:
        b = os.read(0, 1)
        if not b:
            return
        if b == b"\x03":
            child.send_signal(signal.SIGINT)


threading.Thread(target=pty, daemon=True).start()
sys.exit(child.wait() & 0xFF)
'''




def test_up_hosts_starts_remote_workers_over_ssh(hosts, control_engines, tmp_path):
    """`cosine up --hosts` in the head namespace: the verifier starts locally, both drafters
    through "ssh" in their own namespaces (with --remote-config / --remote-worker), the
    cluster serves lossless output, a remote drafter killed with -9 is started again through
    its ssh session and re-admitted, and SIGTERM stops every remote worker."""
    cfg = write_config(tmp_path / "config.toml", control_engines["target"], 5700)
    remote_cfg = tmp_path / "remote" / "config.toml"   # "the copy on the drafter hosts"
    remote_cfg.parent.mkdir()
    remote_cfg.write_text(cfg.read_text())
    fake = tmp_path / "fake-ssh"
    fake.write_text(FAKE_SSH.format(python=sys.executable))
    fake.chmod(0o755)
    log = tmp_path / "ssh.log"
    env = {**os.environ, "FAKE_SSH_LOG": str(log)}
    worker = _exe("cosine-worker", "cosine.workers.main")
    cmd = ["ip", "netns", "exec", hosts["head"], *_exe("cosine", "cosine.cli"), "up", "--config", str(cfg),
           "--hosts", f"{ADDR['d0']}={hosts['d0']}", f"lookup={hosts['d1']}", "--ssh", str(fake),
           "--remote-config", str(remote_cfg), "--remote-worker", " ".join(worker)]
    t0 = time.monotonic()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    seen: list[str] = []
    client = None
    try:
        wait_line(proc, "cosine is up: clients connect to tcp://", 120, seen)
        up_s = time.monotonic() - t0
        calls = [json.loads(x) for x in log.read_text().splitlines()]
        assert sorted(c["dest"] for c in calls) == sorted([hosts["d0"], hosts["d1"]])  # verifier-0 is local
        for c in calls:
            assert c["argv"][0] == "-tt"
            assert f"--config {remote_cfg}" in c["command"] and c["command"].startswith("exec ")
        assert {c["command"].rsplit("--name ", 1)[1] for c in calls} == {"good", "lookup"}

        client = NsClient(hosts["head"], f"tcp://{ADDR['head']}:5700", tmp_path)
        assert client.call("health")["drafters"] == {"good": True, "lookup": True}
        ref = client.generate(PROMPTS[0], "autoregressive")
        got = client.generate(PROMPTS[0], "cosine")
        assert got["ok"] and got["token_ids"] == ref["token_ids"]
        assert "good" in got["stats"]["drafters_used"]
        assert _draft_steps(client.call("stats"), "good") > 0

        # kill -9 the remote drafter: its ssh session ends, `cosine up` starts it again over ssh
        remote = subprocess.run(["ip", "netns", "pids", hosts["d0"]], capture_output=True, text=True).stdout.split()
        assert remote, "no process in d0"
        for pid in remote:
            os.kill(int(pid), signal.SIGKILL)
        wait_line(proc, "drafter good (pid", 60, seen)
        assert "exited unexpectedly" in seen[-1] and "(its ssh session ended)" in seen[-1], seen[-1]
        wait_line(proc, "good is back (restart 1", 60, seen)
        calls = [json.loads(x) for x in log.read_text().splitlines()]
        assert [c["dest"] for c in calls].count(hosts["d0"]) == 2  # the same ssh command, again
        _wait_readmitted(client, "good")
        _check_used_again(client, "good", [ref["token_ids"]] + [client.generate(p, "autoregressive")["token_ids"]
                                                                for p in PROMPTS[1:]])
        client.close()
        client = None

        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(40)
        rest = proc.stdout.read()
        assert rc == 0, "".join(seen) + rest
        # the drafters ran in their namespaces under the fake ssh: all gone now
        for h in ("d0", "d1"):
            left = subprocess.run(["ip", "netns", "pids", hosts[h]], capture_output=True, text=True).stdout.split()
            assert not left, f"processes left in {hosts[h]}: {left}"
        print(f"\ncosine up --hosts: up in {up_s:.1f} s, stopped in {time.monotonic() - t0 - up_s:.1f} s after")
    finally:
        if client is not None:
            client.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        for h in ("d0", "d1", "head"):
            _kill_namespace_procs(hosts[h])


def test_three_hosts_lossless(deployment, reference):
    c = deployment.client
    # the drafters are only on their own hosts: not on the head's loopback, but over the bridge
    assert not c.call("tcp", host="127.0.0.1", port=5602)["ok"]
    assert c.call("tcp", host=ADDR["d0"], port=5602)["ok"]
    assert c.call("tcp", host=ADDR["d1"], port=5603)["ok"]
    assert c.call("health")["drafters"] == {"good": True, "lookup": True}
    for mode in ("cosine", "speculative", "specinfer"):
        qs = [c.submit("generate", prompt=p, max_tokens=MAX_TOKENS, mode=mode) for p in PROMPTS]
        res = [c.wait(q) for q in qs]
        for p, r, ref in zip(PROMPTS, res, reference):
            assert r["ok"], r
            assert r["token_ids"] == ref, f"{mode} differs from autoregressive on {p}"
        if mode == "cosine":
            assert any("good" in r["stats"]["drafters_used"] for r in res)
            assert max(r["stats"]["mean_accepted_length"] for r in res) > 1.5  # drafts crossed the link
    st = c.call("stats")
    assert _draft_steps(st, "good") > 0 and _draft_steps(st, "lookup") > 0
    assert _wait_no_requests_held(c) == {"verifier-0": 0, "good": 0, "lookup": 0}


def _outcomes(results: list[dict], reference: list[list[int]], t_down: float, t_up: float, what: str) -> list[str]:
    """One line per request: its time relative to t_down and how it ended."""
    rows = []
    for r in results:
        when = "before" if r["t1"] < t_down else "after" if r["t0"] > t_up else "during"
        end = ("identical to autoregressive" if r["token_ids"] == reference[r["prompt"]] else "DIFFERENT") \
            if r["ok"] else f"FAILED {r['code']}: {r['message']}"
        span = f"{r['t0'] - t_down:+6.2f} .. {r['t1'] - t_down:+6.2f} s"
        rows.append(f"  prompt {r['prompt']} thread {r['thread']} {span} ({when} {what}): {end}")
    return rows


def _watch_until_done(c: NsClient, load: queue.Queue, name: str) -> tuple[list[dict], float | None]:
    """Wait for a load to finish while polling health; returns its results and the first
    time ``name`` was seen alive again (None if not while the load ran)."""
    alive_at, deadline = None, time.monotonic() + 120
    while True:
        try:
            return NsClient.wait(load, 0.25), alive_at
        except queue.Empty:
            assert time.monotonic() < deadline, "the load did not finish within 120 s"
        if alive_at is None and c.call("health")["drafters"][name]:
            alive_at = time.monotonic()


def _check_used_again(c: NsClient, name: str, reference: list[list[int]]) -> None:
    before = _draft_steps(c.call("stats"), name)
    res = [c.generate(p, "cosine") for p in PROMPTS]
    assert [r["token_ids"] for r in res] == reference
    assert any(name in r["stats"]["drafters_used"] for r in res)
    assert _draft_steps(c.call("stats"), name) > before, f"{name} was re-admitted but did not draft"


LINK_DOWN_MAX_S = 30.0  # bound on the wait for serve to mark the cut-off drafter dead


def test_drafter_link_loss(deployment, reference):
    """`ip link set vd0 down` (the head side of d0's veth) under load until serve has marked
    the drafter dead (at most LINK_DOWN_MAX_S), then up again."""
    c, head = deployment.client, deployment.hosts["head"]
    load = c.submit("load", prompts=PROMPTS, max_tokens=MAX_TOKENS, mode="cosine", threads=3, duration_s=8.0)
    time.sleep(1.5)
    t_down = time.monotonic()
    ip("-n", head, "link", "set", LINK["d0"], "down")
    try:
        dead_at = None
        while dead_at is None and time.monotonic() - t_down < LINK_DOWN_MAX_S:
            if not c.call("health")["drafters"]["good"]:
                dead_at = time.monotonic()
            elif not load.empty():  # the load is over: drive the rounds that notice the death
                c.generate(PROMPTS[0], "cosine", max_tokens=8)
            else:
                time.sleep(0.1)
    finally:
        ip("-n", head, "link", "set", LINK["d0"], "up")
    t_up = time.monotonic()
    results, alive_at = _watch_until_done(c, load, "good")
    rows = _outcomes(results, reference, t_down, t_up, "the outage")
    print(f"\nlink to d0 down at +0.00 s, up at +{t_up - t_down:.2f} s; per-request outcome:\n" + "\n".join(rows))
    assert all(r["ok"] and r["token_ids"] == reference[r["prompt"]] for r in results), "\n".join(rows)
    assert any(r["t0"] < t_down and r["t1"] > t_down for r in results), "no request was running when the link went down"
    assert dead_at is not None, f"the drafter behind the cut link was not marked dead within {LINK_DOWN_MAX_S:g} s"

    # recovery: re-admitted once the link is back, drafts again, outputs still identical
    alive_at = alive_at or _wait_readmitted(c, "good")
    _check_used_again(c, "good", reference)
    print(f"drafter good marked dead {dead_at - t_down:.1f} s after the link went down (worker_timeout_s "
          f"{WORKER_TIMEOUT_S}), seen alive again {alive_at - t_up:.1f} s after it came back up")
    print("serve's log:\n" + "\n".join(deployment.serve_log("drafter good")[-2:]))
    held = _wait_no_requests_held(c)
    assert held == {"verifier-0": 0, "good": 0, "lookup": 0}, f"requests still held after all finished: {held}"


def test_drafter_restart_rejoins(deployment, reference):
    """SIGKILL the drafter worker in d0 under load, restart it there: serve re-admits it."""
    c = deployment.client
    load = c.submit("load", prompts=PROMPTS, max_tokens=MAX_TOKENS, mode="cosine", threads=2, duration_s=6.0)
    time.sleep(1.0)
    old = deployment.children["good"]
    old.proc.kill()
    old.proc.wait(10)
    t_kill = time.monotonic()
    dead_at = None
    while time.monotonic() - t_kill < 2.0:
        if dead_at is None and not c.call("health")["drafters"]["good"]:
            dead_at = time.monotonic()
        time.sleep(0.2)
    deployment.spawn("good").wait_ready(time.monotonic() + 60)
    t_ready = time.monotonic()
    results, alive_at = _watch_until_done(c, load, "good")
    rows = _outcomes(results, reference, t_kill, t_ready, "the kill .. READY window")
    print(f"\ndrafter good SIGKILLed at +0.00 s, restarted and READY at +{t_ready - t_kill:.2f} s; "
          f"per-request outcome:\n" + "\n".join(rows))
    assert all(r["ok"] and r["token_ids"] == reference[r["prompt"]] for r in results), "\n".join(rows)
    assert any(r["t0"] < t_kill and r["t1"] > t_kill for r in results), "no request was running at the kill"

    alive_at = alive_at or _wait_readmitted(c, "good")
    _check_used_again(c, "good", reference)
    print(("marked dead %.1f s after the kill; " % (dead_at - t_kill) if dead_at else "never seen dead; ")
          + f"the restarted worker was re-admitted {alive_at - t_ready:.1f} s after its READY and drafts again")
    held = _wait_no_requests_held(c)
    assert held == {"verifier-0": 0, "good": 0, "lookup": 0}, f"requests still held after all finished: {held}"
