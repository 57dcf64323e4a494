"""Opt-in (COSINE_REAL_MODELS=1): the Qwen2.5-Coder pair, exported to engines/, through
the real cluster. Every mode must give the target's greedy tokens, with the shipped
GGUF-block target (int8 activations: exact through key slots) and the float32 one."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from conftest import write_cluster_config

REPO = Path(__file__).resolve().parents[1]
ENGINES = Path(os.environ.get("COSINE_ENGINES_DIR", REPO / "engines"))
TARGETS = [ENGINES / "qwen2.5-coder-1.5b-gguf", ENGINES / "qwen2.5-coder-1.5b-fp32"]
DRAFTER = ENGINES / "qwen2.5-coder-0.5b-int4"

pytestmark = [
    pytest.mark.real_models,
    pytest.mark.skipif(os.environ.get("COSINE_REAL_MODELS") != "1", reason="opt-in: set COSINE_REAL_MODELS=1"),
    pytest.mark.skipif(not (DRAFTER / "manifest.json").is_file(), reason=f"needs {DRAFTER} (make demo exports it)"),
]

PROMPTS = ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
           "The capital of France is"]


@pytest.mark.parametrize("target", TARGETS, ids=lambda p: p.name)
def test_qwen_pair_every_mode_matches_autoregressive(tmp_path: Path, target: Path) -> None:
    from cosine.client import Client
    from cosine.control.cluster import LocalCluster

    if not (target / "manifest.json").is_file():
        pytest.skip(f"needs {target} (make demo exports the shipped one; cosine-export the other)")
    cfg = write_cluster_config(tmp_path / "config.toml", target, {"qwen-0.5b": DRAFTER, "lookup": ("lookup", None)},
                               limits={"max_prompt_tokens": 512},
                               controller={"worker_timeout_s": 120.0, "request_timeout_s": 1200.0})
    with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=1200) as c:
        for p in PROMPTS:
            ref = c.generate(p, max_tokens=16, mode="autoregressive")
            for mode in ("speculative", "specinfer", "cosine"):
                r = c.generate(p, max_tokens=16, mode=mode)
                assert r.token_ids == ref.token_ids, (mode, p, r.text, ref.text)
            assert r.stats["mean_accepted_length"] > 1.0


def test_worker_bench_against_llamacpp_on_the_same_gguf(tmp_path: Path) -> None:
    """`cosine-bench worker --llamacpp`: the engine and llama.cpp on the file it was exported from."""
    import json
    import subprocess
    import sys

    pytest.importorskip("llama_cpp", reason="needs llama-cpp-python (docs/benchmarks/README.md)")
    target = TARGETS[0]
    man = json.loads((target / "manifest.json").read_text()) if (target / "manifest.json").is_file() else {}
    gguf = Path(man.get("source", ""))
    if not gguf.is_file():
        pytest.skip(f"needs {target} and the GGUF file it was exported from")
    p = subprocess.run([sys.executable, "-m", "cosine.workers.bench", "--engine", str(target), "--llamacpp", str(gguf),
                        "--threads", "2", "--iters", "2", "--warmup", "1", "--prefix", "32", "--batches", "1",
                        "--tree-sizes", "1,4", "--prefill-lengths", "16", "--json", str(tmp_path / "r.json")],
                       capture_output=True, text=True, timeout=900, cwd=REPO)
    assert p.returncode == 0, p.stderr[-3000:]
    lc = json.loads((tmp_path / "r.json").read_text())["llamacpp"]
    assert lc["same_source"] is True
    assert [r["shape"] for r in lc["rows"]] == ["prefill 16 tokens", "decode (batch 1)", "verify 1-token chain",
                                                "verify 4-token chain"]
    assert all(r["llamacpp_ms_p50"] > 0 and r["engine_ms_p50"] > 0 for r in lc["rows"])
