"""`tools/gpu/measure.sh --rehearse`: the whole GPU measurement end to end on this CPU with
the tiny test models, exactly as the device calls run it (stage.sh --rehearse builds the
bundle, one `measure.sh put N` process per part starts the preparation in the background,
`measure.sh run` measures and writes $OUT). CUDA-only steps are skipped, saying why. Then
`run` again on the same host: for one step, short of time (steps skipped for the budget,
the summary still written), with an engine gone (steps fail, recorded, the rest goes on),
and repaired (--retry-failed prepares the failed job again)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.gpu_tools import ROOT

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not (ROOT / ".venv" / "bin" / "python").exists(), reason="needs the dev venv")]
MEASURE = ROOT / "tools" / "gpu" / "measure.sh"
OUT_FILES = {"summary.json", "summary.md", "worker.json", "bench-c1.json", "bench-c16.json", "measure.log",
             "results.tar.gz"}


def _measure(*args: str, out: Path, timeout: float) -> subprocess.CompletedProcess:
    env = {**os.environ, "OUT": str(out)}
    return subprocess.run(["bash", str(MEASURE), *args], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=timeout)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory: pytest.TempPathFactory):
    work = tmp_path_factory.mktemp("gpu-rehearsal")
    r = _measure("--rehearse", "--work", str(work), out=work / "out", timeout=600)
    yield work, r
    pid_file = work / "state" / "prepare.pid"
    if pid_file.is_file() and _alive(int(pid_file.read_text())):  # only after a failure above
        os.killpg(int(pid_file.read_text()), 15)


def test_rehearsal_measures_every_step_and_returns_the_same_files(rehearsal) -> None:
    work, r = rehearsal
    assert r.returncode == 0, r.stderr[-3000:]
    out = work / "out"
    assert {p.name for p in out.iterdir()} == OUT_FILES  # at most 8 files come back from the device
    s = json.loads((out / "summary.json").read_text())
    assert s["rehearsal"] is True
    assert [j["status"] for j in s["prepare"]] == ["ok"] * 7, s["prepare"]
    st = {x["name"]: x for x in s["steps"]}
    assert [n for n in st] == ["worker", "bench-c1", "bench-c16", "routing-2", "routing-3", "cuda-graph"]
    assert all(st[n]["status"] == "ok" for n in list(st)[:-1]), st
    assert st["cuda-graph"]["status"] == "skipped" and st["cuda-graph"]["detail"].startswith("CUDA-only")
    assert {g["goal"] for g in s["goals"]} == {"decode-floor", "c1-vs-autoregressive", "c16-vs-speculative",
                                               "vs-hf-assisted", "never-below-autoregressive"}
    assert all(g["status"] in ("met", "not met") for g in s["goals"])  # every goal measured
    assert s["lossless"]["status"] == "ok" and s["lossless"]["outputs_compared"] >= 30
    worker = json.loads((out / "worker.json").read_text())
    assert set(worker["decode"]) == {"1", "4", "16"} and set(worker["verify"]) == {"1", "2", "4", "8", "16", "32", "64"}
    assert worker["floor"]["floor_ms"] == 1.18 and worker["floor"]["decode_rtt_ratio"] > 0
    c1 = json.loads((out / "bench-c1.json").read_text())
    assert {"autoregressive@1", "speculative@1", "specinfer@1", "cosine@1", "hf@1", "hf-assisted@1"} <= set(c1["summary"])
    peers = [x for x in c1["records"] if x.get("peer")]
    assert len(peers) == 8 and {x["device"] for x in peers} == {"cpu"}  # one prompt per domain, both peers
    assert c1["ratios"]["cosine/hf-assisted@1"] > 0 and "--peer-device cpu" in c1["environment"]["command"]
    c16 = json.loads((out / "bench-c16.json").read_text())
    assert {f"{m}@16" for m in ("autoregressive", "speculative", "specinfer", "cosine")} <= set(c16["summary"])
    cfg = (work / "runs" / "routing-3" / "config.toml").read_text()
    assert "max_drafters_per_request = 3" in cfg and 'name = "ngram-german"' in cfg
    md = (out / "summary.md").read_text()
    assert "REHEARSAL" in md and "3 routed drafters" in md
    assert s["placement"]["placements"]["CPUExecutionProvider"] > 10 and not s["placement"]["elsewhere"]
    assert "Graph node placement (drafter engine" in md
    # the background preparation has finished: nothing of it is left running
    assert not _alive(int((work / "state" / "prepare.pid").read_text()))
    # what each call printed: parts staged, the preparation started and progressing
    assert "staged 1 of" in r.stdout and "started the background preparation" in r.stderr


def test_a_rerun_of_some_steps_keeps_the_others_results(rehearsal) -> None:
    work, first = rehearsal
    assert first.returncode == 0
    before = (work / "runs" / "bench-c1" / "results.json").read_bytes()
    out = work / "out-rerun"
    r = _measure("run", "--rehearse", "--work", str(work), "--steps", "routing-2", out=out, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    st = {x["name"]: x["status"] for x in json.loads((out / "summary.json").read_text())["steps"]}
    assert st["routing-2"] == "ok" and st["bench-c1"] == "ok" and len(st) == 6
    assert (work / "runs" / "bench-c1" / "results.json").read_bytes() == before
    assert "routing-2: up to" in r.stderr and "bench-c1: up to" not in r.stderr
    bad = _measure("run", "--rehearse", "--work", str(work), "--steps", "routing-9", out=out, timeout=60)
    assert bad.returncode == 2 and "--steps takes some of" in bad.stderr


def test_short_of_time_the_steps_are_skipped_and_the_summary_still_written(rehearsal) -> None:
    work, first = rehearsal
    assert first.returncode == 0
    out = work / "out-short"
    r = _measure("run", "--rehearse", "--work", str(work), "--budget", "25", out=out, timeout=120)
    assert r.returncode == 1
    s = json.loads((out / "summary.json").read_text())
    st = {x["name"]: x for x in s["steps"]}
    assert st["worker"]["status"] == "skipped" and st["worker"]["detail"].startswith("budget:")
    assert all(x["status"] == "skipped" for x in s["steps"]) and len(s["steps"]) == 6
    assert {g["status"] for g in s["goals"]} == {"not measured"}  # nothing stale from the earlier run


def test_a_failing_step_is_recorded_and_the_later_steps_still_run(rehearsal) -> None:
    work, first = rehearsal
    assert first.returncode == 0
    shutil.rmtree(work / "engines" / "ngram-code")  # the benchmark configs no longer load
    out = work / "out-broken"
    r = _measure("run", "--rehearse", "--work", str(work), "--budget", "300", out=out, timeout=400)
    assert r.returncode == 1
    st = {x["name"]: x for x in json.loads((out / "summary.json").read_text())["steps"]}
    assert st["worker"]["status"] == "ok"
    for name in ("bench-c1", "bench-c16", "routing-2", "routing-3"):
        assert st[name]["status"] == "failed" and "ngram-code" in st[name]["detail"], st[name]
    assert "NOT OK: bench-c1, bench-c16, routing-2, routing-3" in r.stderr
    # the repair inside the lease: the n-gram job counted again, then only the step that needs it
    state = work / "state" / "ngram.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "status": "failed", "detail": "simulated"}))
    r = _measure("run", "--rehearse", "--work", str(work), "--retry-failed", "--steps", "bench-c16", out=out,
                 timeout=400)
    assert "retrying the failed preparation job ngram" in r.stderr
    assert (work / "engines" / "ngram-code" / "manifest.json").is_file()
    st = {x["name"]: x for x in json.loads((out / "summary.json").read_text())["steps"]}
    assert st["bench-c16"]["status"] == "ok" and st["bench-c1"]["status"] == "failed"
