"""`cosine-bench run --api openai` on tiny models: the gateway's added latency table, with
the same greedy text through both APIs. A tiny model generates in milliseconds, so here the
difference between the APIs is the gateway's own cost; on the real models it drowns in the
generation's run-to-run spread (docs/http.md).

    COSINE_HTTP_BENCH_OUT=docs/benchmarks/DIR .venv/bin/python -m pytest tests/test_http_bench.py

keeps the table, measured at concurrency 1 and 16 with every prompt sent 48 times."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from conftest import add_http, free_port, write_cluster_config

KEEP = os.environ.get("COSINE_HTTP_BENCH_OUT")
LEVELS, REPEAT = ([1, 16], 48) if KEEP else ([1, 2], 1)


def test_bench_api_openai_compares_http_with_zmq(control_engines, tmp_path):
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"]})
    add_http(cfg, free_port())
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps({"code": ["def add(a, b):", "for i in"], "prose": ["The sea at dawn was"]}))
    out = Path(KEEP) if KEEP else tmp_path / "out"
    r = subprocess.run([sys.executable, "-m", "cosine.bench", "run", "--api", "openai", "--config", str(cfg),
                        "--prompts", str(prompts), "--domains", "code,prose",
                        "--concurrency", ",".join(map(str, LEVELS)), "--repeat", str(REPEAT),
                        "--max-tokens", "12", "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert [lv["concurrency"] for lv in res["levels"]] == LEVELS
    for lv in res["levels"]:
        assert lv["requests"] == 3 * REPEAT and lv["greedy_mismatches"] == 0
        assert all(rec["zmq"]["text"] and rec["http"]["ttft_s"] <= rec["http"]["latency_s"] for rec in lv["records"])
        assert {"p50_ms", "p95_ms"} <= set(lv["added"]["latency_s"])
    assert "added p50 / p95" in (out / "results.md").read_text()
