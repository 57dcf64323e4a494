"""cosine-bench end to end on tiny models: the run harness (modes, levels, Poisson, ratios,
identity, round timeline, plots) and the per-drafter table, through a real local cluster."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import write_cluster_config

PROMPTS = {"code": ["def add(a, b):\n    return", "for i in range(10):\n    print("],
           "prose": ["The sea at dawn was", "It was a quiet evening and"]}


@pytest.fixture(scope="module")
def bench_config(control_engines, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("bench")
    (root / "prompts.json").write_text(json.dumps(PROMPTS))
    return write_cluster_config(root / "config.toml", control_engines["target"],
                                {"good": control_engines["target"], "poor": control_engines["poor"],
                                 "lookup": ("lookup", None)})


def test_run_reports_every_mode_level_ratio_and_timeline(bench_config: Path, tmp_path: Path) -> None:
    from cosine.bench import main

    out = tmp_path / "run"
    rc = main(["run", "--config", str(bench_config), "--modes", "autoregressive,speculative,cosine",
               "--peers", "none", "--domains", "code,prose", "--prompts", str(bench_config.parent / "prompts.json"),
               "--max-tokens", "12", "--concurrency", "1,2", "--poisson-rate", "20", "--poisson-requests", "4",
               "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "results.json").read_text())
    s = res["summary"]
    for key in ("autoregressive@1", "speculative@2", "cosine@1", "cosine@2", "cosine@poisson20"):
        assert s[key]["requests"] == 4 and s[key]["tokens"] == 48, key
    assert s["cosine@1"]["mean_accepted_length"] > 1.0
    assert set(s["cosine@1"]["mean_accepted_length_by_domain"]) == {"code", "prose"}
    assert set(s["cosine@1"]["mean_accepted_length_by_drafter"]) <= {"good", "poor", "lookup"}
    assert s["cosine@1"]["mean_accepted_length_by_drafter"]
    assert res["identity"]["checked"] >= 16 and res["identity"]["mismatches"] == []
    assert res["ratios"]["cosine/autoregressive@1"] > 0
    assert res["environment"]["git_commit"] and res["environment"]["command"].startswith("cosine-bench")
    tl = res["timelines"]["cosine@1"]
    assert tl and all(len(r) == 8 and r[2] <= r[3] for r in tl)  # verify starts after its own drafting
    assert (out / "throughput.png").is_file() and (out / "timeline_cosine_1.png").is_file()
    assert "cosine/autoregressive@1" in (out / "results.md").read_text()


def test_interleaved_run_pairs_every_prompt_across_modes(bench_config: Path, tmp_path: Path) -> None:
    """--interleave runs every prompt in each mode back to back (repeated passes), reports
    the same per-mode summary and, per prompt and pass, cosine's ratio to each baseline."""
    from cosine.bench import main

    out = tmp_path / "paired"
    args = ["run", "--config", str(bench_config), "--modes", "autoregressive,speculative,cosine", "--peers", "none",
            "--domains", "code,prose", "--prompts", str(bench_config.parent / "prompts.json"), "--max-tokens", "8",
            "--concurrency", "1", "--interleave", "--repeat", "2", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    recs = sorted((r for r in res["records"] if r.get("mode") in ("autoregressive", "speculative", "cosine")),
                  key=lambda r: r["turn"])
    # turn order: for each (pass, prompt), the three modes in a row
    assert [r["mode"] for r in recs] == [r["mode"] for r in recs[:3]] * 8
    assert {r["pass"] for r in recs} == {0, 1}
    for key in ("autoregressive@1", "speculative@1", "cosine@1"):
        assert res["summary"][key]["requests"] == 8 and res["summary"][key]["server_stats_delta"]["rounds"] > 0
    pr = res["paired_ratios"]["cosine/speculative@1"]
    assert pr["pairs"] == 8 and pr["min"] <= pr["ci95"][0] <= pr["geomean"] <= pr["ci95"][1] <= pr["max"]
    assert res["identity"]["mismatches"] == [] and res["timelines"]["cosine@1"]
    assert "geometric mean" in (out / "results.md").read_text()
    with pytest.raises(SystemExit):  # an open-loop run has no waves to take turns on
        main(args[:-2] + ["--poisson-rate", "1", "--out", str(tmp_path / "bad")])


def test_interleaved_waves_pair_modes_under_load(bench_config: Path, tmp_path: Path) -> None:
    """At concurrency 2 the modes take turns on each wave of two prompts sent at once; each
    wave's tokens/s pairs cosine with the baseline under the same load, and the greedy
    outputs stay identical across modes."""
    from cosine.bench import main

    out = tmp_path / "waves"
    args = ["run", "--config", str(bench_config), "--modes", "autoregressive,cosine", "--peers", "none",
            "--domains", "code,prose", "--prompts", str(bench_config.parent / "prompts.json"), "--max-tokens", "8",
            "--concurrency", "2", "--interleave", "--out", str(out)]
    assert main(args) == 0
    res = json.loads((out / "results.json").read_text())
    recs = sorted((r for r in res["records"] if r.get("mode") in ("autoregressive", "cosine")), key=lambda r: r["turn"])
    n = len(recs) // 2
    assert n >= 2 and res["summary"]["cosine@2"]["requests"] == n
    # turns: wave 0 in both modes, then wave 1, ...; a wave's two requests share its wall time
    assert [(r["wave"], r["mode"]) for r in recs] == [(w, m) for w in range(n // 2) for m in
                                                      ("autoregressive", "cosine") for _ in range(2)]
    assert all(r["concurrency"] == 2 and r["wave_wall_s"] >= r["wall_s"] for r in recs)
    pr = res["paired_ratios"]["cosine/autoregressive@2"]
    assert pr["pairs"] == n // 2 and pr["min"] <= pr["geomean"] <= pr["max"]
    assert res["identity"]["mismatches"] == [] and res["identity"]["checked"] == 2 * n


def test_geomean_interval_narrows_with_agreeing_pairs_and_holds_one_when_mixed() -> None:
    from cosine.bench.run import geomean_ci

    assert geomean_ci([1.2] * 8) == pytest.approx([1.2, 1.2])
    lo, hi = geomean_ci([0.8, 1.25] * 8)  # half slower, half faster: cannot tell apart
    assert lo < 1.0 < hi
    lo, hi = geomean_ci([1.1, 1.2, 1.15, 1.3, 1.05, 1.25, 1.1, 1.2])  # all faster
    assert 1.0 < lo < hi < 1.3
    assert geomean_ci([1.5]) == pytest.approx([1.5, 1.5])


def _paired_run(ratios: list[float], commit: str = "c0ffee") -> dict:
    """A results.json with interleaved concurrency-1 records whose cosine/speculative
    ratios are ``ratios`` (speculative at 4 tok/s)."""
    recs = []
    for w, r in enumerate(ratios):
        for mode, tps in (("speculative", 4.0), ("cosine", 4.0 * r)):
            recs.append({"mode": mode, "concurrency": 1, "pass": 0, "wave": w, "tokens": 64, "wall_s": 64 / tps,
                         "wave_wall_s": 64 / tps, "prompt": f"p{w}"})
    return {"environment": {"git_commit": commit * 5}, "records": recs}


def test_pool_adds_pairs_of_runs_and_narrows_the_interval(tmp_path: Path, capsys) -> None:
    from cosine.bench import main
    from cosine.bench.report import pool

    a, b = [1.02, 1.08, 0.97, 1.06], [1.05, 0.99, 1.07, 1.04]
    one, both = pool([_paired_run(a)]), pool([_paired_run(a), _paired_run(b)])
    k = "cosine/speculative@1"
    assert one[k]["pairs"] == 4 and both[k]["pairs"] == 8 and both[k]["cosine_faster"] == 6
    assert both[k]["geomean"] == pytest.approx(float(np.exp(np.mean(np.log(a + b)))))
    assert both[k]["ci95"][1] - both[k]["ci95"][0] < one[k]["ci95"][1] - one[k]["ci95"][0]
    for name, res in (("r1", _paired_run(a)), ("r2", _paired_run(b))):
        (tmp_path / name).mkdir()
        (tmp_path / name / "results.json").write_text(json.dumps(res))
    assert main(["pool", str(tmp_path / "r1"), str(tmp_path / "r2"), "--md", str(tmp_path / "pool.md")]) == 0
    out = capsys.readouterr().out
    assert out.startswith("Pooled paired ratios of 2 runs") and out == (tmp_path / "pool.md").read_text()
    assert "| cosine/speculative@1 | 1.03x | " in out and "6 of 8 |" in out
    with pytest.raises(SystemExit):  # not a run directory: a clear error, not a traceback
        main(["pool", str(tmp_path)])
    assert "no results.json" in capsys.readouterr().err


def test_sigterm_stops_a_run_and_its_cluster(bench_config: Path, tmp_path: Path) -> None:
    """`kill` of a running cosine-bench exits through its cluster's shutdown: no worker is
    left behind (it used to die in place and leave them running)."""
    proc = subprocess.Popen([sys.executable, "-m", "cosine.bench", "load", "--config", str(bench_config), "--up",
                             "--clients", "2", "--duration", "300", "--max-tokens", "12"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline, children = time.monotonic() + 120, []
        while len(children) < 5 and time.monotonic() < deadline:  # 4 workers and cosine-serve
            time.sleep(0.5)
            children = subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True).stdout.split()
        assert len(children) >= 5, f"the cluster did not start: children {children}"
        time.sleep(3)  # clients are generating
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 128 + signal.SIGTERM, proc.stdout.read()  # interrupted, not finished
        left = [c for c in children if Path(f"/proc/{c}").exists()
                and Path(f"/proc/{c}/stat").read_text().split(")")[-1].split()[0] != "Z"]
        assert not left, f"processes left running: {left}"
    finally:
        if proc.poll() is None:
            proc.kill()


def test_drafters_table_pins_each_drafter(bench_config: Path, tmp_path: Path) -> None:
    from cosine.bench import main

    out = tmp_path / "drafters"
    rc = main(["drafters", "--config", str(bench_config), "--prompts", str(bench_config.parent / "prompts.json"),
               "--domains", "code,prose", "--per-domain", "1", "--max-tokens", "12", "--out", str(out)])
    assert rc == 0
    res = json.loads((out / "drafters.json").read_text())
    table = res["summary"]["table"]
    assert set(table) == {"autoregressive", "good", "poor", "lookup", "cosine"}
    # the "good" drafter is the target's own engine: every draft token is accepted
    for d in ("code", "prose"):
        assert table["good"][d]["mean_accepted_length"] > 0.8 * (1 + res["draft_len"])  # 12 tokens: 5+5+2
        assert table["good"][d]["mean_accepted_length"] > table["poor"][d]["mean_accepted_length"]
        assert res["summary"]["best"][d]["drafter"] == "good"
    for r in res["records"]:
        if r["mode"] == "speculative":  # pinned: only that drafter ever drafted for it
            assert set(r["drafters_used"]) <= {r["row"]}, r
    assert any(r["drafters_used"] == ["poor"] for r in res["records"] if r["row"] == "poor")
    assert res["summary"]["identity"]["mismatches"] == []
    assert "| good |" in (out / "drafters.md").read_text()


def test_unknown_pinned_drafter_is_a_clear_error(control_cluster) -> None:
    from cosine.client import BadRequest, Client

    with Client(control_cluster.endpoint, timeout_s=30) as c:
        with pytest.raises(BadRequest, match="unknown drafter"):
            c.generate("hello", max_tokens=4, drafters=["nope"])
        r = c.generate("hello", max_tokens=4, mode="speculative", drafters=["poor"])
        assert r.stats["drafters_used"] in (["poor"], [])


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(st.sampled_from(["code", "docs", "prose"]), st.text(max_size=4)), max_size=20),
       st.integers(0, 4))
def test_peer_prompts_are_the_first_of_each_domain_in_order(items: list, k: int) -> None:
    from cosine.bench.run import peer_items

    got = peer_items(items, k)
    if k == 0:
        assert got == items
        return
    it = iter(items)
    assert all(x in it for x in got)  # a subsequence, order kept
    for d in ("code", "docs", "prose"):
        assert [x for x in got if x[0] == d] == [x for x in items if x[0] == d][:k]


def test_peer_device_is_checked(bench_config: Path, tmp_path: Path) -> None:
    from cosine.bench import main

    with pytest.raises(SystemExit) as e:
        main(["run", "--config", str(bench_config), "--peer-device", "gpu0", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and not (tmp_path / "x").exists()


def test_identity_fails_modes_and_only_informs_on_peers() -> None:
    """Every cosine mode must equal autoregressive; llama.cpp's outputs are compared with
    cosine's autoregressive and its speculative ones with its own greedy, without failing."""
    from cosine.bench.report import table
    from cosine.bench.run import identity

    rec = lambda mode, prompt, ids: {"mode": mode, "prompt": prompt, "token_ids": ids}  # noqa: E731
    records = [rec("autoregressive", "a", [1, 2, 3]), rec("cosine", "a", [1, 2, 3]), rec("speculative", "a", [1, 2, 4]),
               rec("llamacpp", "a", [1, 9, 9]), rec("llamacpp-lookup", "a", [1, 9, 9]),
               rec("llamacpp-draft", "a", [1, 9, 8])]
    ident = identity(records)
    assert ident["checked"] == 3 and ident["mismatches"] == [("speculative", "a")]
    assert ident["peers_against_autoregressive"]["llamacpp"] == {"identical": 0, "requests": 1,
                                                                 "mean_common_prefix": 1.0}
    own = ident["peers_against_llamacpp"]
    assert own["llamacpp-lookup"]["identical"] == 1 and own["llamacpp-draft"]["mean_common_prefix"] == 2.0
    assert "llamacpp" not in own
    env = {"command": "cosine-bench run", "git_commit": "0" * 40, "date": "2026-12-07",
           "machine": {"host": "vm", "cpu_count": 2}, "onnxruntime": "1.32.0", "workers": []}
    md = table({"environment": env, "summary": {}, "ratios": {}, "identity": ident})
    assert "llamacpp-draft against llama.cpp's own greedy decoding: 0 of 1 outputs identical" in md


def test_report_indexes_runs_nested_and_of_other_benchmarks(tmp_path: Path) -> None:
    """`cosine-bench report` lists every results.json below the root, newest first: a run's
    table, and a link for another benchmark's results (the HTTP gateway's)."""
    from cosine.bench.report import main

    env = {"command": "cosine-bench run", "git_commit": "0" * 40, "date": "2026-12-07T10:00:00+00:00",
           "machine": {"host": "vm", "cpu_count": 2}, "onnxruntime": "1.32.0", "workers": []}
    (tmp_path / "place" / "split").mkdir(parents=True)
    (tmp_path / "place" / "split" / "results.json").write_text(json.dumps({"environment": env, "summary": {}}))
    (tmp_path / "http").mkdir()
    (tmp_path / "http" / "results.json").write_text(json.dumps({"date": "2026-12-07T11:00:00+00:00", "levels": []}))
    assert main([str(tmp_path)]) == 0
    index = (tmp_path / "README.md").read_text()
    assert index.index("## http") < index.index("## place/split")
    assert "See [http/results.md](http/results.md)." in index and "Commit `000000000000`" in index
