"""`cosine-bench`: every mode through the real cluster, plus the Hugging Face peers, in
one invocation, so that ratios compare like with like.

    cosine-bench run --config config.toml [--modes ...] [--concurrency 1,4,16] ...
    cosine-bench worker ...        per-engine worker numbers (workers/bench.py)
    cosine-bench drafters ...      each drafter alone per domain (cosine/bench/drafters.py)
    cosine-bench profile --engine DIR   time per ONNX op type of a decode step and a verify
                                   (ONNX Runtime's profiler; cosine/bench/profile.py)
    cosine-bench report DIR        regenerate docs/benchmarks/README.md from results JSON
    cosine-bench pool RUN RUN ...  pool the paired ratios of several runs of the same code
    cosine-bench run --api openai --config config.toml --concurrency 1,16
                                   the HTTP gateway's added latency (cosine/bench/http_api.py)
    cosine-bench load --config config.toml --clients N --duration T [--up] [--out DIR]
                                   N closed-loop clients for T s: errors, latency, RSS of
                                   every cosine process (cosine/bench/load.py)
    cosine-bench chaos --config config.toml [--clients 8] [--out DIR]
                                   kill -9 each kind of process under `cosine up`,
                                   account for every request (cosine/bench/chaos.py)
"""

from __future__ import annotations

import argparse
import signal
import sys


def main(argv: list[str] | None = None) -> int:
    cli = argv is None  # the command line, not a test calling main()
    argv = list(sys.argv[1:] if argv is None else argv)
    if cli:
        # SIGTERM (a batch scheduler, `kill`) must stop the local cluster a run started as
        # Ctrl-C does: exit through the `with LocalCluster` blocks instead of dying in place
        # and leaving the worker processes behind.
        signal.signal(signal.SIGTERM, _exit_on_signal)
    if argv and argv[0] == "worker":
        from cosine.workers.bench import main as m
        return int(m(argv[1:]) or 0)
    if argv and argv[0] == "drafters":
        from cosine.bench.drafters import main as m
        return int(m(argv[1:]) or 0)
    if argv and argv[0] == "load":
        from cosine.bench.load import main as m
        return int(m(argv[1:]) or 0)
    if argv and argv[0] == "profile":
        from cosine.bench.profile import main as m
        return int(m(argv[1:]) or 0)
    if argv and argv[0] == "chaos":  # kill -9 each process kind under `cosine up` (cosine/bench/chaos.py)
        from cosine.bench.chaos import main as m
        return int(m(argv[1:]) or 0)
    if argv and argv[0] == "report":
        from cosine.bench.report import main as m
        return int(m(argv[1:]) or 0)
    if argv and argv[0] == "pool":
        from cosine.bench.report import pool_main as m
        return int(m(argv[1:]) or 0)
    if argv and argv[0] == "run":
        argv = argv[1:]
    if any(a == "--api" or a.startswith("--api=") for a in argv):  # the HTTP gateway against ZeroMQ
        from cosine.bench.http_api import main as m
        return int(m(argv) or 0)
    if argv and argv[0] in ("-h", "--help") and len(argv) == 1:
        print(__doc__.strip())
    from cosine.bench.run import main as m
    return int(m(argv) or 0)


def _exit_on_signal(signum: int, _frame: object) -> None:
    raise SystemExit(128 + signum)


__all__ = ["main", "argparse"]
