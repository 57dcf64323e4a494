"""`cosine-bench chaos`: kill -9 each kind of process of a `cosine up` cluster under load,
one after the other, and account for every request.

    cosine-bench chaos --config config.toml [--clients 8] [--targets model lookup ngram serve gateway]
                       [--max-tokens 32] [--kill-at 2] [--settle 2] [--out DIR]

Starts `cosine up` itself (the supervisor users run) and reads its log for the pid of
every child and for each restart. For every target in turn: N closed-loop clients send
greedy requests (cosine-bench load's client loop), the target's process is SIGKILLed
``--kill-at`` seconds in, the phase waits until `cosine up` has restarted it and it serves
again (a drafter: serve's health shows it alive; serve: a fresh client gets an answer),
lets the load run ``--settle`` seconds more, and reports submitted / completed / failed
(by error class and code) / lost requests and greedy outputs that differ from
autoregressive (computed first, through the same cluster).

Targets: ``model``, ``lookup``, ``ngram`` (the first drafter worker of that kind in the
config), ``verifier`` (the first verifier: serve parks its requests and prefills them
again from their committed tokens once it is back), ``serve`` and ``gateway`` (the HTTP
gateway child; skipped, saying why, when the config has no ``[http]`` section). The gateway
phase's load is N streaming HTTP clients of /v1/completions (cosine/bench/http_load.py):
connections refused while it is down are counted apart, as requests never sent.

Required (exit code 1 otherwise): drafter and verifier kills 0 failed and 0 lost; a serve
or gateway kill only ``ConnectionLost`` errors, at most one per client (the requests in
flight), and 0 lost; every phase 0 greedy mismatches, its process back and no request left
held on a worker afterwards. Writes DIR/chaos.json and
DIR/chaos.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cosine import config as cfgmod
from cosine.bench.http_load import completion, run_http_load
from cosine.bench.load import DEFAULT_PROMPTS, run_load, settle_workers

KINDS = ("model", "lookup", "ngram", "serve", "gateway", "verifier")
DEFAULT_TARGETS = ("model", "lookup", "ngram", "verifier", "serve", "gateway")
DRAFTERS = ("model", "lookup", "ngram")
_STARTED = re.compile(r"cosine\.control\.cluster: (\S+) started: pid (\d+)")
_BACK = re.compile(r"cosine\.control\.supervisor: (\S+) is back \(restart \d+, pid (\d+)\)")
_RESTARTED = re.compile(r"cosine\.control\.supervisor: restarted (?:\S+ )?(\S+) \(restart \d+\): pid (\d+)")
_UP = re.compile(r"cosine is up: clients connect to (\S+)")


@dataclass(frozen=True)
class Target:
    kind: str                 # one of KINDS
    name: str                 # the child's name in cosine up's log ("good", "serve", ...)
    skip: str = ""            # why it is not run ("" = run it)


def pick_targets(cfg: cfgmod.Config, kinds: list[str]) -> list[Target]:
    """The process each requested kind kills in this config (or why it cannot)."""
    drafters = {w.name: cfg.model(w.model).kind for w in cfg.drafter_workers()}
    out = []
    for k in kinds:
        if k in ("serve", "gateway", "verifier"):
            name = cfg.verifier_workers()[0].name if k == "verifier" else k
            skip = ""
            if k == "gateway" and cfg.http is None:
                skip = "the config has no [http] section, so `cosine up` runs no gateway"
            out.append(Target(k, name, skip))
            continue
        want = "neural" if k == "model" else k
        name = next((n for n, kind in drafters.items() if kind == want), "")
        out.append(Target(k, name or "-", "" if name else f"the config has no {k} drafter worker"))
    return out


class UpProcess:
    """`cosine up` as a subprocess; its log lines give each child's pid and restarts."""

    def __init__(self, config: Path, log: Path | None = None):
        cmd = [sys.executable, "-m", "cosine.control.cluster", "--config", str(config), "--log-level", "INFO"]
        self.proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.pids: dict[str, int] = {}
        self.back: list[tuple[float, str]] = []      # (time, child) of each "is back" line
        self.endpoint = ""
        self.lines: list[str] = []
        self._cv = threading.Condition()
        self._log = open(log, "w") if log else None  # noqa: SIM115 - closed in stop()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            if self._log:
                self._log.write(line)
            with self._cv:
                self.lines.append(line.rstrip())
                if m := _STARTED.search(line) or _RESTARTED.search(line):
                    self.pids[m.group(1)] = int(m.group(2))
                if m := _BACK.search(line):
                    self.back.append((time.monotonic(), m.group(1)))
                if m := _UP.search(line):
                    self.endpoint = m.group(1)
                self._cv.notify_all()
        with self._cv:
            self._cv.notify_all()

    def wait_for(self, cond: Any, timeout_s: float) -> bool:
        with self._cv:
            return self._cv.wait_for(lambda: cond() or self.proc.poll() is not None, timeout_s) and bool(cond())

    def back_since(self, name: str, t: float) -> float | None:
        return next((bt for bt, n in self.back if n == name and bt >= t), None)

    def stop(self) -> tuple[int | None, float | None]:
        """SIGTERM; returns cosine up's exit code and how long it took to stop (None: it had
        exited by itself). Its last log lines are in ``lines`` afterwards."""
        t0 = time.monotonic()
        running = self.proc.poll() is None
        if running:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        stop_s = time.monotonic() - t0 if running else None
        self._reader.join(10)
        if self._log:
            self._log.close()
        return self.proc.returncode, stop_s


def reference_outputs(endpoint: str, prompts: list[str], max_tokens: int, curve: Any) -> dict[str, list[int]]:
    from cosine.client import Client

    with Client(endpoint, timeout_s=300, curve=curve) as c:
        return {p: c.generate(p, max_tokens=max_tokens, mode="autoregressive", ignore_eos=True).token_ids
                for p in prompts}


def serving_again(target: Target, endpoint: str, cfg: cfgmod.Config, curve: Any, old_session: str) -> bool:
    """Does the cluster use the restarted process again?"""
    from cosine.client import Client, CosineError

    if target.kind == "gateway":
        http = getattr(cfg, "http", None)
        host, port = getattr(http, "host", None), getattr(http, "port", None)
        if not (host and port):
            return True  # nothing to probe but its restart
        try:
            socket.create_connection((host, int(port)), timeout=1).close()
            return True
        except OSError:
            return False
    try:
        with Client(endpoint, timeout_s=2, curve=curve, connect_timeout_s=2) as c:
            h = c.health()
    except CosineError:
        return False
    if target.kind == "serve":
        return h.get("session") != old_session
    if target.kind == "verifier":
        return bool(h.get("verifiers", {}).get(target.name, False))
    return bool(h.get("drafters", {}).get(target.name, True))


def _http_target(cfg: cfgmod.Config) -> tuple[str, str, str]:
    """The gateway's base URL, an API key it accepts ("" if none is configured) and the model name."""
    h = cfg.http
    return f"http://{h.host}:{h.port}", (h.api_keys or ("",))[0], h.model_name or cfg.target_model().name


def _session(endpoint: str, curve: Any) -> str:
    from cosine.client import Client

    with Client(endpoint, timeout_s=30, curve=curve) as c:
        return str(c.health().get("session"))


def _draft_ops(endpoint: str, name: str, curve: Any) -> int | None:
    """Draft ops the (restarted) drafter process has served: > 0 means serve uses it again."""
    from cosine.client import Client, CosineError

    try:
        with Client(endpoint, timeout_s=30, curve=curve) as c:
            w = c.stats()["workers"].get(name) or {}
    except CosineError:
        return None
    return int(w["steps"].get("draft", 0)) if "steps" in w else None


def kill_and_recover(up: UpProcess, target: Target, cfg: cfgmod.Config, a: argparse.Namespace, curve: Any,
                     session: str) -> dict[str, Any]:
    """SIGKILL the target's process; seconds until `cosine up` has it back and until it serves again."""
    pid = up.pids[target.name]
    t_kill = time.monotonic()
    os.kill(pid, signal.SIGKILL)
    gone = up.wait_for(lambda: up.pids.get(target.name) != pid, a.recover_timeout)
    back = up.wait_for(lambda: up.back_since(target.name, t_kill) is not None, a.recover_timeout) \
        if target.kind != "gateway" else gone  # a gateway need not print READY
    restarted = (up.back_since(target.name, t_kill) or time.monotonic()) - t_kill if back else None
    deadline = time.monotonic() + a.recover_timeout
    while back and not serving_again(target, up.endpoint, cfg, curve, session):
        if time.monotonic() > deadline or up.proc.poll() is not None:
            back = False
            break
        time.sleep(0.2)
    return {"pid": pid, "restarted_s": restarted, "serving_s": time.monotonic() - t_kill if back else None}


def run_phase(up: UpProcess, target: Target, cfg: cfgmod.Config, a: argparse.Namespace, prompts: list[str],
              reference: dict[str, list[int]], curve: Any) -> dict[str, Any]:
    """Load, kill -9 ``target`` at ``kill_at`` s, wait until it serves again, settle, stop the load."""
    stop, out = threading.Event(), {}
    session = _session(up.endpoint, curve)
    if target.kind == "gateway":  # a gateway loss hits HTTP clients: load it through HTTP
        base, key, model = _http_target(cfg)
        texts = {p: completion(base, key, model, p, max_tokens=a.max_tokens, mode="autoregressive",
                               timeout_s=a.timeout, seed=0)["text"] for p in prompts}
        work = lambda: run_http_load(base, key, model, prompts, a.clients, a.max_phase, a.max_tokens,  # noqa: E731
                                     a.mode, a.timeout, texts, stop)
    else:
        work = lambda: run_load(up.endpoint, prompts, a.clients, a.max_phase, a.max_tokens, a.mode,  # noqa: E731
                                timeout_s=a.timeout, curve=curve, reference=reference, stop=stop)
    load = threading.Thread(target=lambda: out.update(work()), daemon=True)
    load.start()
    time.sleep(a.kill_at)
    row: dict[str, Any] = {"kind": target.kind, "process": target.name,
                           **kill_and_recover(up, target, cfg, a, curve, session)}
    time.sleep(a.settle)
    stop.set()
    load.join(a.timeout + 60 if up.proc.poll() is None else 5)  # its clients wait in vain for a dead cluster
    row["load"] = {k: out.get(k) for k in ("api", "requests", "determinism", "wall_s", "latency_s")} if out else None
    if up.proc.poll() is not None:
        row["up_exited"] = up.proc.returncode
        return row
    row["after"] = settle_workers(up.endpoint, curve=curve)
    if target.kind in DRAFTERS:
        row["drafted_after"] = _draft_ops(up.endpoint, target.name, curve)
    return row


def problems(row: dict[str, Any], clients: int) -> list[str]:
    """What breaks the requirements in one phase's row (empty: it passed)."""
    if row.get("skip"):
        return []
    out = []
    if row.get("up_exited") is not None:
        out.append(f"cosine up exited with code {row['up_exited']} after the kill")
    if row.get("load") is None:
        return out + ["the load did not finish"]
    req, det = row["load"]["requests"], row["load"]["determinism"]
    if row.get("serving_s") is None:
        out.append(f"{row['process']} was not serving again within the recovery timeout")
    if req["lost"]:
        out.append(f"{req['lost']} requests lost")
    if det["mismatches"]:
        out.append(f"{det['mismatches']} greedy outputs differ from autoregressive")
    errors = dict(req["errors"])
    if row["kind"] in ("serve", "gateway"):  # only the requests in flight through the killed process
        lost_conn = errors.pop("ConnectionLost(unavailable)" if row["kind"] == "serve" else "ConnectionLost(http)", 0)
        if lost_conn > clients:
            out.append(f"{lost_conn} ConnectionLost but only {clients} requests can be in flight")
    if errors:
        out.append(f"failed requests: {errors}")
    held = {n: v for n, v in row.get("after", {}).get("workers_held", {}).items() if v not in (0, None)}
    if held:
        out.append(f"requests still held by workers afterwards: {held}")
    return out


def _errors(req: dict[str, Any]) -> str:
    failed = ", ".join(f"{v} {k}" for k, v in sorted(req["errors"].items())) or "0"
    return failed + (f" ({req['refused']} refused while down, not sent)" if req.get("refused") else "")


def markdown(res: dict[str, Any]) -> str:
    lines = ["| kill -9 | process | back (restarted by cosine up) | serving again | submitted | completed | "
             "failed (codes) | lost | greedy = autoregressive | draft ops after | verdict |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        if r.get("skip"):
            lines.append(f"| {r['kind']} | {r['process']} | - | - | - | - | - | - | - | - | skipped: {r['skip']} |")
            continue
        f = lambda x: "never" if x is None else f"{x:.1f} s"  # noqa: E731
        verdict = "; ".join(r["problems"]) or "pass"
        if not r.get("load"):
            lines.append(f"| {r['kind']} | {r['process']} | {f(r['restarted_s'])} | {f(r['serving_s'])} | "
                         f"- | - | - | - | - | - | {verdict} |")
            continue
        req, det = r["load"]["requests"], r["load"]["determinism"]
        lines.append(f"| {r['kind']} | {r['process']} | {f(r['restarted_s'])} | {f(r['serving_s'])} | "
                     f"{req['submitted']} | {req['completed']} | {_errors(req)} | {req['lost']} | "
                     f"{det['checked'] - det['mismatches']} of {det['checked']} | {r.get('drafted_after', '-')} | "
                     f"{verdict} |")
    return "\n".join(lines) + "\n"


def run(cfg: cfgmod.Config, a: argparse.Namespace) -> dict[str, Any]:
    from cosine.security import CurveKeys

    curve = CurveKeys.from_config(cfg.security)
    prompts = a.prompts or DEFAULT_PROMPTS
    targets = pick_targets(cfg, a.targets)
    up = UpProcess(cfg.path, a.out / "up.log" if a.out else None)
    res: dict[str, Any] = {"rows": []}
    try:
        if not up.wait_for(lambda: bool(up.endpoint), a.start_timeout):
            raise RuntimeError("cosine up did not come up:\n" + "\n".join(up.lines[-40:]))
        reference = reference_outputs(up.endpoint, prompts, a.max_tokens, curve)
        for t in targets:
            if t.skip:
                res["rows"].append({"kind": t.kind, "process": t.name, "skip": t.skip})
                continue
            if up.proc.poll() is not None:
                res["rows"].append({"kind": t.kind, "process": t.name, "skip": "not run: cosine up had exited",
                                    "problems": [f"{t.kind}: not run, cosine up had exited"]})
                continue
            row = run_phase(up, t, cfg, a, prompts, reference, curve)
            row["problems"] = problems(row, a.clients)
            res["rows"].append(row)
            print(markdown({"rows": [row]}).splitlines()[-1], flush=True)
    finally:
        res["up_exit"], res["up_stop_s"] = up.stop()
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-bench chaos", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--targets", nargs="+", choices=KINDS, default=list(DEFAULT_TARGETS),
                    help="what to kill, in this order (default: %(default)s)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--mode", default="cosine", choices=cfgmod.MODES)
    ap.add_argument("--prompts", nargs="+", default=None, help="prompt texts (default: cosine-bench load's)")
    ap.add_argument("--kill-at", type=float, default=2.0, help="seconds into each phase's load")
    ap.add_argument("--settle", type=float, default=2.0, help="seconds of load after the process serves again")
    ap.add_argument("--recover-timeout", type=float, default=90.0)
    ap.add_argument("--max-phase", type=float, default=300.0, help="upper bound of one phase's load (s)")
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    ap.add_argument("--start-timeout", type=float, default=300.0, help="seconds for `cosine up` to come up")
    ap.add_argument("--out", type=Path, default=None, help="write chaos.json, chaos.md and up.log here")
    a = ap.parse_args(argv)
    cfg = cfgmod.load_for_cli(a.config, "cosine-bench chaos")
    if cfg is None:
        return 2
    if a.clients < 1 or a.kill_at <= 0:
        print("cosine-bench chaos: --clients must be >= 1 and --kill-at > 0", file=sys.stderr)
        return 2
    if a.out:
        a.out.mkdir(parents=True, exist_ok=True)
    res = run(cfg, a)
    cmd = "cosine-bench chaos " + " ".join(sys.argv[1:] if argv is None else argv)
    res.update(command=cmd, config=str(cfg.path), clients=a.clients, max_tokens=a.max_tokens, mode=a.mode,
               date=dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"))
    table = markdown(res)
    stop_s = res["up_stop_s"]
    how = "had exited by itself" if stop_s is None else f"stopped on SIGTERM in {stop_s:.1f} s"
    print(table + f"cosine up {how}, exit code {res['up_exit']}")
    if a.out:
        (a.out / "chaos.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
        (a.out / "chaos.md").write_text(f"# cosine-bench chaos, {res['date']}\n\n`{cmd}`\n\n{a.clients} clients, "
                                        f"max_tokens {a.max_tokens}, mode {a.mode}, greedy.\n\n{table}")
    failed = [p for r in res["rows"] for p in r.get("problems", [])]
    return 1 if failed or res["up_exit"] != 0 or res["up_stop_s"] is None else 0


if __name__ == "__main__":
    sys.exit(main())
