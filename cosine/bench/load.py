"""`cosine-bench load`: N closed-loop clients for T seconds against a cosine cluster, with
the memory of every cosine process sampled each second.

    cosine-bench load --config config.toml --clients 8 --duration 600 [--endpoint E]
                      [--max-tokens 64] [--prompts P ...] [--mode cosine] [--up] [--out DIR]

Each client has its own connection and sends its next request as soon as the previous one
ended (closed loop) until the duration is over; requests in flight then are waited for.
Every submitted request is accounted for: completed, or failed with a typed error (counted
by class and server code), or lost (an untyped exception, or never finished). Greedy
outputs are checked against the first output of the same prompt (`determinism`).

The RSS of cosine-serve and every cosine-worker of the config (and `cosine up` itself) is
read from /proc/PID/status each --rss-interval seconds; processes are found by their
command line (`cosine.workers.main` / `cosine-worker` / `cosine.control.serve` /
`cosine-serve`, with --config resolving to the same file), so restarted processes are
picked up. `--up` starts the cluster itself (`cosine up`) and stops it afterwards.

Writes DIR/load.json, DIR/load.md and (when matplotlib is installed) DIR/rss.png.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import logging
import os
import platform
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import numpy as np

from cosine import config as cfgmod

log = logging.getLogger("cosine.bench.load")

DEFAULT_PROMPTS = [
    "def fib(n):\n    ",
    "The storm had passed by morning, and",
    "NAME\n       grep - print lines",
    "Es war einmal ein kleines Dorf",
]

# command-line markers of the cosine processes, by role
_WORKER = ("cosine.workers.main", "cosine-worker")
_SERVE = ("cosine.control.serve", "cosine-serve")
_UP = ("cosine.control.cluster",)


# ----- processes and memory ------------------------------------------------------------------

def _cmdline(pid: int) -> list[str]:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [a.decode(errors="replace") for a in raw.split(b"\0") if a]


def _arg(argv: list[str], flag: str) -> str | None:
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith(flag + "="):
            return a[len(flag) + 1:]
    return None


def _role(argv: list[str]) -> str | None:
    """"worker", "serve", "up" or None, from the program and module/subcommand only (a
    path or prompt further on must not match)."""
    prog = [Path(a).name for a in argv[:3]]
    if any(m in prog for m in _WORKER):
        return "worker"
    if any(m in prog for m in _SERVE):
        return "serve"
    if any(m in prog for m in _UP):
        return "up"
    if len(prog) >= 3 and prog[1] == "cosine" and prog[2] in ("worker", "serve", "up"):
        return prog[2]
    if prog and prog[0] == "cosine" and len(prog) >= 2 and prog[1] in ("worker", "serve", "up"):
        return prog[1]
    return None


def cosine_processes(config_path: Path | None) -> dict[str, int]:
    """{label: pid} of the cosine processes on this machine that run ``config_path``
    (all cosine processes when it is None). Labels: "serve", "up", or the worker name."""
    want = config_path.resolve() if config_path else None
    out: dict[str, int] = {}
    me = os.getpid()
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) == me:
            continue
        pid = int(d.name)
        argv = _cmdline(pid)
        role = _role(argv) if argv else None
        if role is None:
            continue
        if want is not None:
            cfg = _arg(argv, "--config") or "config.toml"
            try:
                p = Path(cfg) if Path(cfg).is_absolute() else Path(os.readlink(f"/proc/{pid}/cwd")) / cfg
                if p.resolve() != want:
                    continue
            except OSError:
                continue
        label = (_arg(argv, "--name") or f"worker-{pid}") if role == "worker" else role
        if label in out:  # two of one name (a restart in progress): keep the newer
            label = f"{label}#{pid}"
        out[label] = pid
    return out


def rss_kib(pid: int) -> int | None:
    """Resident set size (VmRSS) in KiB, or None when the process is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


class RssSampler(threading.Thread):
    """Samples the RSS of the cluster's processes every ``interval_s`` (re-scanning /proc
    each time, so restarted processes appear under their label with a new pid)."""

    def __init__(self, config_path: Path | None, interval_s: float = 1.0):
        super().__init__(name="rss-sampler", daemon=True)
        self.config_path = config_path
        self.interval_s = interval_s
        self.samples: dict[str, list[tuple[float, int, int]]] = {}  # label -> (t, pid, KiB)
        self._halt = threading.Event()
        self.t0 = time.monotonic()

    def sample(self) -> None:
        t = time.monotonic() - self.t0
        for label, pid in cosine_processes(self.config_path).items():
            kib = rss_kib(pid)
            if kib is not None:
                self.samples.setdefault(label, []).append((round(t, 3), pid, kib))

    def run(self) -> None:
        while not self._halt.is_set():
            t_next = time.monotonic() + self.interval_s
            try:
                self.sample()
            except Exception:  # noqa: BLE001 - a vanished /proc entry must not end sampling
                log.exception("RSS sample failed")
            self._halt.wait(max(0.0, t_next - time.monotonic()))

    def stop(self) -> None:
        self._halt.set()
        self.join(5)
        self.sample()  # one last point at the end


def rss_summary(samples: list[tuple[float, int, int]]) -> dict[str, Any]:
    """Growth = mean RSS of the last third of the samples minus that of the first third."""
    kib = np.array([s[2] for s in samples], dtype=np.float64)
    n = len(kib)
    third = max(1, n // 3)
    first, last = float(kib[:third].mean()), float(kib[-third:].mean())
    return {"pids": sorted({s[1] for s in samples}), "n": n, "first_mib": kib[0] / 1024, "last_mib": kib[-1] / 1024,
            "max_mib": float(kib.max()) / 1024, "first_third_mib": first / 1024, "last_third_mib": last / 1024,
            "growth_mib": (last - first) / 1024, "growth_frac": (last - first) / first if first else 0.0}


# ----- the load -----------------------------------------------------------------------------

def _pct(xs: list[float]) -> dict[str, float | None]:
    if not xs:
        return {"p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    a = np.asarray(xs)
    return {"p50": float(np.percentile(a, 50)), "p90": float(np.percentile(a, 90)),
            "p99": float(np.percentile(a, 99)), "max": float(a.max()), "mean": float(a.mean())}


def error_kind(e: BaseException) -> tuple[str, bool]:
    """("Class(code)", typed?) for counting."""
    from cosine.client import CosineError

    if isinstance(e, CosineError):
        return f"{type(e).__name__}({e.code})", True
    return f"untyped:{type(e).__name__}", False


def run_clients(client_loop: Callable[[int], None], clients: int, deadline: float, timeout_s: float,
                name: str) -> None:
    """``client_loop(i)`` for i < clients, each on its own thread, until they return (a client
    past its deadline has at most its request timeout left, plus a margin)."""
    threads = [threading.Thread(target=client_loop, args=(i,), name=f"{name}-{i}", daemon=True)
               for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(1.0, deadline - time.monotonic()) + timeout_s + 30)


def run_load(endpoint: str, prompts: list[str], clients: int, duration_s: float, max_tokens: int = 32,
             mode: str | None = None, temperature: float = 0.0, timeout_s: float = 120.0, stream: str = "mix",
             ignore_eos: bool = True, error_backoff_s: float = 0.1, curve: Any = None,
             reference: dict[str, list[int]] | None = None, stop: threading.Event | None = None) -> dict[str, Any]:
    """N closed-loop clients for ``duration_s`` (or until ``stop`` is set); returns the
    accounting and latencies. After an error a client waits ``error_backoff_s`` before its
    next request (as a real client backs off on Overloaded). Greedy outputs are checked
    against ``reference`` (prompt -> token ids), else against the first output of each prompt."""
    from cosine.client import Client

    lock = threading.Lock()
    submitted = [0]
    completed: list[dict[str, Any]] = []
    errors: Counter[str] = Counter()
    untyped: list[str] = []
    reference = dict(reference or {})
    mismatches: list[dict[str, Any]] = []
    finished_threads = [0]
    t_start = time.monotonic()
    deadline = t_start + duration_s

    def client_loop(ci: int) -> None:
        use_stream = stream == "on" or (stream == "mix" and ci % 2 == 1)
        k = ci
        with Client(endpoint, timeout_s=timeout_s, curve=curve) as c:
            while time.monotonic() < deadline and not (stop is not None and stop.is_set()):
                prompt = prompts[k % len(prompts)]
                k += 1
                with lock:
                    submitted[0] += 1
                t0 = time.monotonic()
                try:
                    r = c.generate(prompt, max_tokens=max_tokens, mode=mode, temperature=temperature,
                                   stream=use_stream, ignore_eos=ignore_eos, seed=k if temperature > 0 else None)
                    if use_stream:
                        ids = [t for ch in r for t in ch.token_ids]
                        res = r.result
                        assert res is not None and res.token_ids == ids, "stream chunks differ from the result"
                    else:
                        res = r
                    lat = time.monotonic() - t0
                    with lock:
                        completed.append({"latency_s": lat, "tokens": len(res.token_ids), "client": ci,
                                          "ttft_s": res.stats.get("ttft_s"), "end": time.monotonic() - t_start})
                        if temperature == 0:
                            ref = reference.setdefault(prompt, list(res.token_ids))
                            if ref != list(res.token_ids) and len(mismatches) < 20:
                                mismatches.append({"prompt": prompt, "expected": ref, "got": list(res.token_ids)})
                            elif ref != list(res.token_ids):
                                mismatches.append({})
                except Exception as e:  # noqa: BLE001 - every outcome is counted, none is raised
                    kind, typed = error_kind(e)
                    with lock:
                        errors[kind] += 1
                        if not typed:
                            untyped.append(repr(e)[:300])
                    time.sleep(error_backoff_s if typed else max(0.1, error_backoff_s))
        with lock:
            finished_threads[0] += 1

    run_clients(client_loop, clients, deadline, timeout_s, "load-client")
    wall = time.monotonic() - t_start
    n_err = sum(errors.values())
    typed_err = sum(v for k, v in errors.items() if not k.startswith("untyped:"))
    lats = [c["latency_s"] for c in completed]
    toks = sum(c["tokens"] for c in completed)
    return {
        "endpoint": endpoint, "clients": clients, "duration_s": duration_s, "wall_s": wall,
        "max_tokens": max_tokens, "mode": mode, "temperature": temperature, "stream": stream,
        "prompts": prompts, "client_timeout_s": timeout_s, "error_backoff_s": error_backoff_s,
        "requests": {"submitted": submitted[0], "completed": len(completed), "errors": dict(errors),
                     "errors_total": n_err, "typed_errors": typed_err,
                     "lost": submitted[0] - len(completed) - typed_err,
                     "clients_unfinished": clients - finished_threads[0]},
        "untyped_errors": untyped[:20],
        "latency_s": _pct(lats),
        "ttft_s": _pct([c["ttft_s"] for c in completed if c["ttft_s"] is not None]),
        "tokens": toks, "tokens_per_s": toks / wall if wall else 0.0,
        "requests_per_s": len(completed) / wall if wall else 0.0,
        "determinism": {"checked": len(completed) if temperature == 0 else 0, "mismatches": len(mismatches),
                        "examples": [m for m in mismatches if m][:3]},
    }


def settle_workers(endpoint: str, timeout_s: float = 10.0, curve: Any = None) -> dict[str, Any]:
    """Server stats after the load; waits (up to ``timeout_s``) until no worker holds a request
    (releases are asynchronous). Returns {"workers_held": {name: n}, "server": stats}."""
    from cosine.client import Client, CosineError

    deadline = time.monotonic() + timeout_s
    st: dict[str, Any] = {}
    held: dict[str, Any] = {}
    with Client(endpoint, timeout_s=30, curve=curve) as c:
        while True:
            try:
                st = c.stats()
            except CosineError as e:
                return {"error": str(e), "workers_held": {}, "server": {}}
            held = {n: w.get("requests_held") for n, w in (st.get("workers") or {}).items()}
            if all(v == 0 for v in held.values()) or time.monotonic() > deadline:
                break
            time.sleep(0.25)
    keep = ("requests_done", "requests_failed", "active_requests", "queued_requests", "queue_waits", "rounds",
            "tokens", "mean_accepted_length", "verifiers", "drafters", "resumed_requests")
    return {"workers_held": held, "resumed_requests": st.get("resumed_requests", 0),
            "server": {k: st.get(k) for k in keep if k in st}}


# ----- report -----------------------------------------------------------------------------------

def write_outputs(res: dict[str, Any], out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "load.json"]
    (out / "load.json").write_text(json.dumps(res, indent=1, default=float) + "\n")
    (out / "load.md").write_text(markdown(res))
    written.append(out / "load.md")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib not installed: no rss.png")
        return written
    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, s in sorted(res.get("rss_samples", {}).items()):
        ax.plot([x[0] for x in s], [x[2] / 1024 for x in s], label=label)
    ax.set_xlabel("time since the load started (s)")
    ax.set_ylabel("RSS (MiB)")
    r = res["requests"]
    ax.set_title(f"cosine-bench load: {res['clients']} clients, {res['duration_s']:g} s, "
                 f"{r['completed']} done, {r['errors_total']} errors")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "rss.png", dpi=110)
    plt.close(fig)
    written.append(out / "rss.png")
    return written


def _f(x: Any, nd: int = 3) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def markdown(res: dict[str, Any]) -> str:
    r, lat = res["requests"], res["latency_s"]
    lines = [f"# cosine-bench load, {res.get('date', '')}", "",
             f"`{res.get('command', '')}`", "",
             f"{res['clients']} closed-loop clients for {res['duration_s']:g} s (wall {res['wall_s']:.1f} s), "
             f"max_tokens {res['max_tokens']}, mode {res['mode'] or 'server default'}, stream {res['stream']}.", "",
             "| submitted | completed | errors | lost | p50 latency (s) | p99 latency (s) | tokens/s | requests/s |",
             "|---|---|---|---|---|---|---|---|",
             f"| {r['submitted']} | {r['completed']} | {r['errors_total']} | {r['lost']} | {_f(lat['p50'])} | "
             f"{_f(lat['p99'])} | {res['tokens_per_s']:.1f} | {res['requests_per_s']:.2f} |", ""]
    if r["errors"]:
        lines += ["Errors by kind: " + ", ".join(f"{k}: {v}" for k, v in sorted(r["errors"].items())), ""]
    d = res["determinism"]
    if d["checked"]:
        lines += [f"Greedy determinism: {d['checked']} outputs checked against the first of their prompt, "
                  f"{d['mismatches']} mismatches.", ""]
    after = res.get("after") or {}
    if after.get("workers_held") is not None:
        lines += ["Requests held by the workers after the run: " +
                  ", ".join(f"{k}: {v}" for k, v in sorted(after["workers_held"].items())), ""]
    lines += ["| process | pids | samples | first (MiB) | max (MiB) | last (MiB) | growth first->last third (MiB) |",
              "|---|---|---|---|---|---|---|"]
    for label, s in sorted(res.get("rss", {}).items()):
        lines.append(f"| {label} | {','.join(map(str, s['pids']))} | {s['n']} | {s['first_mib']:.1f} | "
                     f"{s['max_mib']:.1f} | {s['last_mib']:.1f} | {s['growth_mib']:+.2f} ({100 * s['growth_frac']:+.1f}%) |")
    return "\n".join(lines) + "\n"


# ----- command ------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cosine-bench load", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=Path("config.toml"))
    ap.add_argument("--endpoint", default=None, help="default: [controller] endpoint of the config")
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--prompts", nargs="+", default=None, help="prompt texts (default: four short built-in ones)")
    ap.add_argument("--mode", default=None, help="generation mode (default: the server's)")
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--stream", choices=("off", "on", "mix"), default="mix", help="mix: odd clients stream")
    ap.add_argument("--eos", action="store_true", help="stop at eos (default: run to --max-tokens)")
    ap.add_argument("--timeout", type=float, default=120.0, help="client timeout per request (s)")
    ap.add_argument("--error-backoff", type=float, default=0.1,
                    help="seconds a client waits after an error (e.g. Overloaded) before its next request")
    ap.add_argument("--rss-interval", type=float, default=1.0)
    ap.add_argument("--up", action="store_true", help="start the cluster of --config first, stop it afterwards")
    ap.add_argument("--out", type=Path, default=None, help="write load.json, load.md, rss.png here")
    ap.add_argument("--log-level", default="WARNING")
    a = ap.parse_args(argv)
    logging.basicConfig(level=a.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = cfgmod.load_for_cli(a.config, "cosine-bench load")
    if cfg is None:
        return 2
    if a.clients < 1 or a.duration <= 0:
        print("cosine-bench load: --clients must be >= 1 and --duration > 0", file=sys.stderr)
        return 2
    endpoint = a.endpoint or cfg.controller.endpoint
    cluster = None
    if a.up:
        from cosine.control.cluster import ClusterError, LocalCluster

        try:
            cluster = LocalCluster(cfg.path).start()
        except ClusterError as e:
            print(f"cosine-bench load: could not start the cluster: {e}", file=sys.stderr)
            return 1
    sampler = RssSampler(cfg.path, a.rss_interval)
    try:
        sampler.start()
        from cosine.security import CurveKeys

        keys = CurveKeys.from_config(cfg.security)
        res = run_load(endpoint, a.prompts or DEFAULT_PROMPTS, a.clients, a.duration, a.max_tokens, a.mode,
                       a.temperature, a.timeout, a.stream, ignore_eos=not a.eos, error_backoff_s=a.error_backoff,
                       curve=keys)
        res["after"] = settle_workers(endpoint, curve=keys)
        sampler.stop()
        dead = cluster.dead_child() if cluster else None
    finally:
        if sampler.is_alive():
            sampler.stop()
        if cluster is not None:
            cluster.stop()
    res.update({
        "command": "cosine-bench load " + " ".join(sys.argv[1:] if argv is None else argv),
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "config": str(cfg.path), "started_cluster": a.up, "dead_child": dead,
        "machine": {"host": platform.node(), "cpu_count": os.cpu_count(), "python": platform.python_version()},
        "rss": {k: rss_summary(v) for k, v in sampler.samples.items() if v},
        "rss_samples": {k: [list(x) for x in v] for k, v in sampler.samples.items()},
    })
    if not res["rss"]:
        log.warning("no cosine processes of %s found in /proc (remote cluster?): no RSS figures", cfg.path)
    r = res["requests"]
    print(f"load: {r['submitted']} submitted, {r['completed']} completed, {r['errors_total']} errors "
          f"{r['errors'] or ''}, {r['lost']} lost; latency p50 {_f(res['latency_s']['p50'])} s "
          f"p99 {_f(res['latency_s']['p99'])} s; {res['tokens_per_s']:.1f} tok/s")
    for label, s in sorted(res["rss"].items()):
        print(f"  rss {label:<14} {s['first_mib']:7.1f} -> {s['last_mib']:7.1f} MiB (max {s['max_mib']:.1f}, "
              f"growth first->last third {s['growth_mib']:+.2f} MiB)")
    if a.out:
        for p in write_outputs(res, a.out):
            print(f"wrote {p}")
    return 0 if r["lost"] == 0 and not dead else 1


if __name__ == "__main__":
    sys.exit(main())
