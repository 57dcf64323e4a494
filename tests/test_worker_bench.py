"""`cosine-bench worker` (workers/bench.py) end to end on a tiny engine with --quick settings:
one real run through the CLI (tiny llama export, a real worker process, the in-process
engine), then checks on its JSON, markdown and table; plus the one-line setting errors."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime as ort
import pytest

from cosine.workers import bench

REPO = Path(__file__).resolve().parents[1]
BATCHES, TREES, PREFILLS, ITERS = (1, 3), (1, 5, 12), (16, 40), 8


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict:
    out = tmp_path_factory.mktemp("worker-bench")
    cmd = [sys.executable, "-m", "cosine.workers.bench", "--quick", "--iters", str(ITERS),
           "--batches", ",".join(map(str, BATCHES)), "--tree-sizes", ",".join(map(str, TREES)),
           "--prefill-lengths", ",".join(map(str, PREFILLS)), "--floor-ms", "0.01",
           "--json", str(out / "r.json"), "--md", str(out / "sub" / "r.md")]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=120, cwd=REPO)
    assert p.returncode == 0, p.stdout + p.stderr
    return {"json": json.loads((out / "r.json").read_text()), "md": (out / "sub" / "r.md"), "stdout": p.stdout}


def _rows(res: dict) -> list[tuple[str, dict]]:
    rows = [(f"overhead/{op}", res["overhead"][op]) for op in ("draft", "verify")]
    for sec in ("prefill", "decode", "verify"):
        rows += [(f"{sec}/{k}", r) for k, r in res[sec].items()]
    return rows


def test_every_section_with_the_requested_keys(run: dict) -> None:
    res = run["json"]
    assert list(res["prefill"]) == [str(x) for x in PREFILLS]
    assert list(res["decode"]) == [str(x) for x in BATCHES]
    assert list(res["verify"]) == [str(x) for x in TREES]
    assert [r["batch"] for r in res["decode"].values()] == list(BATCHES)
    assert [r["depth"] for r in res["verify"].values()] == [n - 1 for n in TREES]  # chains
    s = res["settings"]
    assert (s["iters"], s["warmup"], s["prefix"], s["tree_shape"]) == (ITERS, bench.default_warmup(ITERS), 16, "chain")
    for name, r in _rows(res):
        for k in ("rtt_ms_p50", "rtt_ms_p95", "engine_ms_p50", "engine_ms_p95", "op_ms_mean"):
            assert r[k] > 0, (name, k, r)
        assert r["rtt_ms_p95"] >= r["rtt_ms_p50"] and r["engine_ms_p95"] >= r["engine_ms_p50"], (name, r)
        assert r["overhead_ms_p50"] == pytest.approx(r["rtt_ms_p50"] - r["engine_ms_p50"])
    assert res["overhead"]["health_rtt_ms_p50"] > 0
    for sec, n in (("prefill", "tokens"), ("decode", "batch")):
        for r in res[sec].values():
            assert r["rtt_tokens_per_s"] == pytest.approx(r[n] * 1e3 / r["rtt_ms_p50"])
            assert r["engine_tokens_per_s"] == pytest.approx(r[n] * 1e3 / r["engine_ms_p50"])


def test_round_trip_is_not_cheaper_than_the_engine(run: dict) -> None:
    # A round trip contains one forward of the same shape plus transport, codec and two
    # thread hops (>= a few hundred microseconds): it cannot come out below the engine time.
    for name, r in _rows(run["json"]):
        assert r["rtt_ms_p50"] >= r["engine_ms_p50"], (name, r)
        assert r["op_ms_mean"] < 2 * r["rtt_ms_p95"], (name, r)  # the op runs inside the round trip


def test_warmups_excluded_and_requests_released(run: dict) -> None:
    res = run["json"]
    ws, calls = res["worker_stats"], ITERS + res["settings"]["warmup"]
    assert ws["requests_held"] == 0 and ws["cache_tokens_used"] == 0 and not ws["errors"]
    # overhead verify + one measurement per batch and per tree size, warm-ups included
    assert ws["steps"]["verify"] == calls * (1 + len(BATCHES) + len(TREES))
    assert ws["steps"]["draft"] == calls
    # one prefill per prefill call; + 1 each for overhead, the decode batches, the trees
    assert ws["steps"]["prefill"] == calls * len(PREFILLS) + 1 + len(BATCHES) + 1


def test_environment_and_floor(run: dict) -> None:
    res = run["json"]
    env = res["environment"]
    assert env["engine"]["name"] == "tiny-llama" and env["engine"]["dtype"] == "float32"
    assert env["engine"]["weight_bytes"] > 0
    assert (env["provider"], env["device"], env["threads"]) == ("cpu", "cpu", 1)
    assert env["onnxruntime"] == ort.__version__
    assert env["host"] and env["cpu_count"] >= 1 and isinstance(env["git_commit"], str)
    fl = res["floor"]
    assert fl["floor_ms"] == 0.01
    assert fl["decode_rtt_ratio"] == pytest.approx(res["decode"]["1"]["rtt_ms_p50"] / 0.01)
    assert fl["decode_engine_ratio"] == pytest.approx(res["decode"]["1"]["engine_ms_p50"] / 0.01)


def test_markdown_and_table(run: dict) -> None:
    md = run["md"].read_text()
    for head in ("## Per-call overhead", "## Prefill", "## Decode step", "## Verify against tree size",
                 "## Memory-bandwidth floor"):
        assert head in md, head
    for b in BATCHES:
        assert f"\n| {b} | " in md
    out = run["stdout"]
    assert "verify8" in out and "health round trip p50" in out  # the original overhead table comes first
    assert out.index("per-call overhead") < out.index("prefill") < out.index("decode step") < out.index("verify vs")


def _error(capsys: pytest.CaptureFixture[str], argv: list[str], main=bench.main) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cosine-bench worker: error: ")
    return err


def test_bad_provider_is_one_line_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    p = subprocess.run([sys.executable, "-m", "cosine.workers.bench", "--provider", "bogus"],
                       capture_output=True, text=True, timeout=60, cwd=REPO)
    assert p.returncode == 2 and not p.stdout
    assert len(p.stderr.strip().splitlines()) == 1 and "'bogus'" in p.stderr and "cpu, cuda, tensorrt" in p.stderr
    assert "cuda:N" in _error(capsys, ["--provider", "cpu", "--device", "cuda:0"])
    assert "integers" in _error(capsys, ["--batches", "1,x"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        assert "not available" in _error(capsys, ["--provider", "cuda"])


def test_shapes_beyond_the_context_fail_before_anything_starts(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"max_positions": 64, "vocab_size": 64}))
    assert "context of 64" in _error(capsys, ["--engine", str(tmp_path), "--quick", "--prefill-lengths", "65"])
    assert "context of 64" in _error(capsys, ["--engine", str(tmp_path), "--quick", "--prefix", "60"])
    assert "not an engine directory" in _error(capsys, ["--engine", str(tmp_path / "nope")])


def test_tree_shapes() -> None:
    assert bench.tree_parents(4, "chain").tolist() == [-1, 0, 1, 2]
    assert bench.tree_parents(7, "binary").tolist() == [-1, 0, 0, 1, 1, 2, 2]
    assert bench.tree_depth(7, "binary") == 2 and bench.tree_depth(8, "binary") == 3
    assert bench.tree_depth(8, "chain") == 7


def test_llamacpp_setting_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                 monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "model.onnx").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps({"max_positions": 64, "vocab_size": 64}))
    gguf = tmp_path / "m.gguf"
    base = ["--engine", str(tmp_path), "--quick", "--llamacpp", str(gguf)]
    assert "no such file" in _error(capsys, base)
    gguf.write_bytes(b"GGUF")
    assert "compares chains" in _error(capsys, base + ["--tree-shape", "binary"])
    from cosine.bench import llamacpp

    monkeypatch.setattr(llamacpp, "available", lambda: "llama.cpp peers skipped: llama-cpp-python is not installed")
    assert "not installed" in _error(capsys, base)


def test_a_peer_takes_turns_with_the_engine_call_for_call(worker_engines: dict[str, Path]) -> None:
    s = bench.Settings(iters=4, warmup=1, prefix=8, batches=(1, 2), tree_sizes=(1, 4), prefill_lengths=(8,),
                       tree_nodes=4)
    calls: list[str] = []

    def peer(name: str):
        def run() -> None:
            calls.append(name)
        return run

    shapes = {("prefill", 8): peer("prefill"), ("decode", 1): peer("decode"), ("verify", 4): peer("verify4")}
    e = bench.engine_side(worker_engines["llama"], s, lambda msg: None, shapes)
    assert list(e["peer"]) == list(shapes)  # the shapes the peer has; decode batch 2 and verify 1 are the engine's alone
    assert all(len(ms) == s.iters for ms in e["peer"].values())
    assert calls.count("decode") == s.iters + s.warmup
    res = bench.against_llamacpp(e, {"gguf": "m.gguf", "same_source": False, "threads": 1})
    assert [r["shape"] for r in res["rows"]] == ["prefill 8 tokens", "decode (batch 1)", "verify 4-token chain"]
    for r in res["rows"]:
        assert r["engine_speed"] == pytest.approx(r["llamacpp_ms_p50"] / r["engine_ms_p50"])
    md = bench.markdown_report({"settings": {"iters": 4, "warmup": 1, "prefix": 8, "tree_shape": "chain"},
                                "overhead": {"health_rtt_ms_p50": 1.0, "tree_nodes": 4, **{
                                    op: {"rtt_ms_p50": 1, "op_ms_p50": 1, "engine_ms_p50": 1, "overhead_ms_p50": 0}
                                    for op in ("draft", "verify")}},
                                "environment": {"engine": {"name": "t", "dtype": "float32", "num_layers": 1,
                                                           "weight_bytes": 1}, "provider": "cpu", "device": "cpu",
                                                "command": "c", "date": "d", "host": "h", "cpu_count": 2,
                                                "platform": "p", "onnxruntime": "o", "threads": 1, "git_commit": ""},
                                "prefill": {}, "decode": {}, "verify": {}, "floor": None, "llamacpp": res})
    assert "## Against llama.cpp" in md and "**not** the engine" in md and "| decode (batch 1) |" in md
