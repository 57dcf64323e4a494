"""kill -9 of each kind of process under `cosine up`, with 8 clients in a closed loop, through
the real command: `cosine-bench chaos` (cosine/bench/chaos.py) starts `cosine up`, kills the
model drafter, the prompt-lookup drafter, the n-gram drafter, the verifier, serve and the
HTTP gateway in turn, and accounts for every request.

Required: drafter and verifier kills cost no request (0 failed, 0 lost, outputs identical
to autoregressive; a restarted drafter is re-admitted and drafts again; the verifier's
requests are parked and prefilled again from their committed tokens); a serve kill fails
only the requests in flight, with ConnectionLost, and loses none.

    COSINE_CHAOS_OUT=docs/reliability/chaos .venv/bin/python -m pytest tests/test_chaos.py -s

keeps the table, its JSON and `cosine up`'s log (docs/reliability.md).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from cosine.bench.chaos import problems

from conftest import build_ngram_engine, free_port, write_cluster_config

CLIENTS = 8


@pytest.fixture(scope="module")
def chaos(control_engines, tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("chaos")
    vocab = json.loads((control_engines["target"] / "manifest.json").read_text())["vocab_size"]
    ngram = build_ngram_engine(root / "ngram-engine", vocab)
    cfg = write_cluster_config(root / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "lookup": ("lookup", None),
                                "ngram": ("ngram", ngram)},
                               controller={"worker_timeout_s": 1.5},
                               sections={"routing": {"max_drafters_per_request": 3}})
    cfg.write_text(cfg.read_text() + f'\n[http]\nhost = "127.0.0.1"\nport = {free_port()}\n')  # the gateway child
    out = Path(os.environ.get("COSINE_CHAOS_OUT") or root / "out")
    cmd = [sys.executable, "-m", "cosine.bench", "chaos", "--config", str(cfg), "--clients", str(CLIENTS),
           "--max-tokens", "16", "--kill-at", "1.5", "--settle", "1.5", "--out", str(out)]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    print(p.stdout)
    res = json.loads((out / "chaos.json").read_text())
    res["rc"], res["stderr"] = p.returncode, p.stderr[-3000:]
    return res


def row(res: dict, kind: str) -> dict:
    return next(r for r in res["rows"] if r["kind"] == kind)


def test_verifier_kill_costs_no_request(chaos):
    r = row(chaos, "verifier")
    req, det = r["load"]["requests"], r["load"]["determinism"]
    assert req["errors_total"] == 0 and req["lost"] == 0, req
    assert req["completed"] == req["submitted"] > CLIENTS
    assert det["checked"] == req["completed"] and det["mismatches"] == 0, det  # identical to an undisturbed run
    assert r["restarted_s"] is not None and r["serving_s"] is not None, r
    assert r["after"]["resumed_requests"] > 0, r["after"]  # the requests on it were parked and resumed
    assert not any(r["after"]["workers_held"].values()), r["after"]


@pytest.mark.parametrize("kind", ["model", "lookup", "ngram"])
def test_drafter_kill_costs_no_request(chaos, kind):
    r = row(chaos, kind)
    req, det = r["load"]["requests"], r["load"]["determinism"]
    assert req["errors_total"] == 0 and req["lost"] == 0, req
    assert req["completed"] == req["submitted"] > CLIENTS
    assert det["checked"] == req["completed"] and det["mismatches"] == 0, det  # identical to autoregressive
    assert r["restarted_s"] is not None and r["serving_s"] is not None, r  # restarted and re-admitted
    assert r["drafted_after"] > 0, r  # the new process drafts again
    assert not any(r["after"]["workers_held"].values()), r["after"]


def test_serve_kill_fails_only_the_requests_in_flight(chaos):
    r = row(chaos, "serve")
    req, det = r["load"]["requests"], r["load"]["determinism"]
    assert set(req["errors"]) <= {"ConnectionLost(unavailable)"}, req["errors"]
    assert 1 <= req["errors_total"] <= CLIENTS and req["lost"] == 0, req  # one per client at most
    assert req["completed"] == req["submitted"] - req["errors_total"] > CLIENTS
    assert det["mismatches"] == 0 and r["serving_s"] is not None, r


def test_gateway_kill_fails_only_the_http_requests_in_flight(chaos):
    """Its load is HTTP clients: the streams in flight are cut (at most one per client),
    connections refused while it is down were never sent, nothing hangs, and the requests it
    had in serve are released."""
    r = row(chaos, "gateway")
    req, det = r["load"]["requests"], r["load"]["determinism"]
    assert r["load"]["api"] == "http" and r["serving_s"] is not None, r
    assert set(req["errors"]) <= {"ConnectionLost(http)"} and req["lost"] == 0, req
    assert req["errors_total"] <= CLIENTS, req
    assert req["completed"] == req["submitted"] - req["errors_total"] > CLIENTS, req
    assert det["checked"] == req["completed"] and det["mismatches"] == 0, det
    assert not any(r["after"]["workers_held"].values()), r["after"]


def test_the_run_passes_and_cosine_up_stops_cleanly(chaos):
    assert chaos["up_exit"] == 0 and chaos["up_stop_s"] is not None and chaos["up_stop_s"] < 10, chaos
    assert chaos["rc"] == 0, chaos["stderr"]


def _row(kind: str, errors: dict | None = None, lost: int = 0, mismatches: int = 0, **extra) -> dict:
    n = sum((errors or {}).values())
    return {"kind": kind, "process": kind, "serving_s": 2.0, "after": {"workers_held": {"v": 0}},
            "load": {"requests": {"submitted": 50, "completed": 50 - n - lost, "errors": errors or {},
                                  "errors_total": n, "lost": lost},
                     "determinism": {"checked": 50 - n - lost, "mismatches": mismatches}}, **extra}


def test_the_judge_of_a_phase():
    assert problems(_row("model"), 8) == []
    assert problems(_row("serve", {"ConnectionLost(unavailable)": 8}), 8) == []
    assert problems(_row("serve", {"ConnectionLost(unavailable)": 9}), 8) == [
        "9 ConnectionLost but only 8 requests can be in flight"]
    assert problems(_row("lookup", {"ConnectionLost(unavailable)": 1}), 8) == [
        "failed requests: {'ConnectionLost(unavailable)': 1}"]
    assert problems(_row("ngram", lost=1, mismatches=2), 8) == ["1 requests lost",
                                                               "2 greedy outputs differ from autoregressive"]
    assert problems(_row("model", serving_s=None), 8) == ["model was not serving again within the recovery timeout"]
    assert problems(_row("model", after={"workers_held": {"v": 2}}), 8) == [
        "requests still held by workers afterwards: {'v': 2}"]
    assert problems({"kind": "model", "process": "good", "load": None, "up_exited": 1}, 8) == [
        "cosine up exited with code 1 after the kill", "the load did not finish"]
    assert problems(_row("gateway", {"ConnectionLost(http)": 3}), 8) == []
    assert problems(_row("gateway", {"HTTP 503": 1}), 8) == ["failed requests: {'HTTP 503': 1}"]
    assert problems(_row("verifier", {"Unavailable(unavailable)": 4}), 8) == [
        "failed requests: {'Unavailable(unavailable)': 4}"]
