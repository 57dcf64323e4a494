"""tools/gpu/measure.sh's parts (docs/gpu.md): the configs generated from the shipped
config.toml, the time plan (property tests), the goals judged against results, and a step
that fails or overruns being recorded while the later steps still run. The whole script
runs end to end in tests/test_gpu_rehearsal.py."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.gpu_tools import ROOT, TOOLS, load_tool

gpuconfig = load_tool("gpuconfig")
plan = load_tool("plan")
goals = load_tool("goals")
hostenv = load_tool("hostenv")
steps = load_tool("steps")
pipeline = load_tool("pipeline")

SHIPPED = tomllib.loads((ROOT / "config.toml").read_text())


def _placed(**kw) -> dict:
    ports = list(range(7000, 7000 + len(SHIPPED["workers"]) + 1))
    return gpuconfig.place(SHIPPED, Path("/e"), Path("/d"), "cuda", "cuda:0", ports,
                           {"target": "/p/target", "drafter": "/p/drafter"}, **kw)


# ---------------------------------------------------------------- configs

def test_placement_keeps_the_shipped_deployment_and_moves_the_models_to_the_gpu() -> None:
    cfg = _placed()
    models = {m["name"]: m for m in cfg["models"]}
    target = next(m for m in cfg["models"] if m["role"] == "target")
    drafter = models["qwen2.5-coder-0.5b"]
    assert (target["engine"], target["dtype"], target["source"]) == ("/e/target", "float16", "/p/target")
    assert (drafter["engine"], drafter["dtype"], drafter["source"]) == ("/e/drafter", "float16", "/p/drafter")
    assert "quantize" not in drafter and drafter["domains"] == ["code", "docs"]
    assert models["ngram-code"]["source"] == "/d/train/code.txt" and models["ngram-code"]["engine"] == "/e/ngram-code"
    on = {w["name"]: (w["device"], w["provider"]) for w in cfg["workers"]}
    assert on["verifier-0"] == on["drafter-0"] == ("cuda:0", "cuda")
    assert all(v == ("cpu", "cpu") for k, v in on.items() if k not in ("verifier-0", "drafter-0"))
    assert len(on) == len(SHIPPED["workers"]) and "http" not in cfg
    ports = [w["port"] for w in cfg["workers"]] + [int(cfg["controller"]["endpoint"].rsplit(":", 1)[1])]
    assert len(set(ports)) == len(ports)
    # everything else is the shipped config's
    for sec in ("speculation", "routing", "fusion", "scheduling"):
        assert cfg["controller"][sec] == SHIPPED["controller"][sec]
    assert cfg["limits"] == SHIPPED["limits"] and not any(w.get("cuda_graph") for w in cfg["workers"])
    assert SHIPPED["models"][1].get("quantize") == "int4"  # the input is untouched


def test_variants_change_only_their_key() -> None:
    base, k3, graph = _placed(), _placed(max_drafters=3), _placed(cuda_graph=True)
    assert k3["controller"]["routing"]["max_drafters_per_request"] == 3
    k3["controller"]["routing"]["max_drafters_per_request"] = base["controller"]["routing"]["max_drafters_per_request"]
    assert k3 == base
    assert [w["name"] for w in graph["workers"] if w.get("cuda_graph")] == ["verifier-0"]


def test_generated_configs_load_and_a_cuda_graph_off_cuda_is_refused(tmp_path: Path) -> None:
    def gen(*extra: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, str(TOOLS / "gpuconfig.py"), "--out", str(tmp_path / "c.toml"),
                               "--engines", str(tmp_path / "e"), "--data", str(tmp_path / "d"), "--no-check", *extra],
                              capture_output=True, text=True, cwd=ROOT, timeout=60)

    r = gen("--max-drafters", "2", "--cuda-graph")
    assert r.returncode == 0, r.stderr
    assert "verifier-0 on cuda:0/cuda" in r.stdout and "drafter-lookup on cpu/cpu" in r.stdout
    assert tomllib.loads((tmp_path / "c.toml").read_text())["controller"]["routing"]["max_drafters_per_request"] == 2
    r = gen("--provider", "cpu", "--device", "cpu", "--cuda-graph")
    assert r.returncode == 1 and 'cuda_graph needs provider "cuda"' in r.stderr


toml_keys = st.text("abcdefghij_", min_size=1, max_size=6)
toml_scalars = st.one_of(st.booleans(), st.integers(-10**6, 10**6), st.text(max_size=12),
                         st.floats(allow_nan=False, allow_infinity=False, width=32))
toml_flat = st.dictionaries(toml_keys, st.one_of(toml_scalars, st.lists(st.integers(0, 99), max_size=3)), max_size=4)


@settings(max_examples=60, deadline=None)
@given(st.dictionaries(toml_keys, st.one_of(toml_scalars, toml_flat, st.lists(toml_flat, min_size=1, max_size=3)),
                       max_size=5))
def test_toml_written_reads_back_equal(d: dict) -> None:
    d = {k: v for k, v in d.items() if not (isinstance(v, list) and not all(v))}  # no empty tables in arrays
    assert tomllib.loads(gpuconfig.dumps(d)) == d


# ---------------------------------------------------------------- the time plan

speeds = st.builds(plan.Speeds, decode_b1_ms=st.floats(0.5, 200), decode_b16_ms=st.floats(0.5, 400),
                   overhead_ms=st.floats(0, 50), cluster_start_s=st.floats(1, 120), hf_tok_s=st.floats(1, 500),
                   peer_load_s=st.floats(0, 120))


@settings(max_examples=200, deadline=None)
@given(speeds, st.floats(0, 3000), st.sampled_from([plan.GPU, plan.REHEARSAL]))
def test_the_plan_fits_when_it_can_and_more_time_never_means_fewer_tokens(s, remaining: float, p) -> None:
    steps_all = plan.BENCH_STEPS
    t = plan.choose_tokens(remaining, steps_all, p, s)
    assert t in p.tokens
    cost = lambda group, tok: sum(plan.estimate(x, tok, p, s) for x in group)  # noqa: E731
    if any(cost(steps_all, c) <= remaining for c in p.tokens):
        assert cost(steps_all, t) <= remaining
    elif any(cost(plan.MAIN_STEPS, c) <= remaining for c in p.tokens):
        assert cost(plan.MAIN_STEPS, t) <= remaining
    else:
        assert t == min(p.tokens)
    assert plan.choose_tokens(remaining * 2 + 1, steps_all, p, s) >= t or cost(steps_all, t) > remaining
    for step in ("worker", *steps_all):
        small, big = plan.estimate(step, min(p.tokens), p, s), plan.estimate(step, max(p.tokens), p, s)
        assert 0 < small <= big
        lim = plan.timeout(step, t, remaining, p, s)
        assert 0 <= lim <= remaining and (lim >= 2 * plan.estimate(step, t, p, s) or lim == remaining)


def test_measured_speeds_come_from_the_worker_step() -> None:
    w = {"decode": {"1": {"rtt_ms_p50": 1.9}, "16": {"rtt_ms_p50": 4.5}}, "timing": {"worker_start_s": 25.0}}
    s = plan.measured(plan.GPU, w)
    assert (s.decode_b1_ms, s.decode_b16_ms, s.cluster_start_s) == (1.9, 4.5, 50.0)
    assert plan.measured(plan.GPU, None) == plan.GPU.guess
    assert plan.measured(plan.GPU, {"decode": {}}).decode_b1_ms == plan.GPU.guess.decode_b1_ms


# ---------------------------------------------------------------- goals

def _run(summary: dict, ratios: dict, mism: list | None = None) -> dict:
    return {"summary": {k: {"tokens_per_s": v} for k, v in summary.items()}, "ratios": ratios,
            "identity": {"checked": 8, "mismatches": mism or []}}


@settings(max_examples=100, deadline=None)
@given(st.floats(0.01, 10), st.floats(0.01, 10), st.floats(0.01, 10), st.floats(0.01, 50), st.floats(0.1, 20))
@example(2.5, 1.3, 1.0, 10.0, 2.36)  # exactly at every bar: met
@example(2.499, 1.299, 0.999, 9.99, 2.361)
def test_each_goal_is_met_exactly_when_its_number_clears_the_bar(c1ar, c16sp, c16ar, hf, dec) -> None:
    runs = {"bench-c1": _run({"cosine@1": 100.0}, {"cosine/autoregressive@1": c1ar, "cosine/hf-assisted@1": hf}),
            "bench-c16": _run({}, {"cosine/speculative@16": c16sp, "cosine/autoregressive@16": c16ar})}
    g = {x["goal"]: x for x in goals.evaluate({"decode": {"1": {"rtt_ms_p50": dec, "engine_ms_p50": dec}}}, runs)}
    want = {"decode-floor": dec <= 2.36, "c1-vs-autoregressive": c1ar >= 2.5, "c16-vs-speculative": c16sp >= 1.3,
            "vs-hf-assisted": hf >= 10.0, "never-below-autoregressive": min(c1ar, c16ar) >= 1.0}
    assert {k: v["status"] == "met" for k, v in g.items()} == want
    assert all(v["status"] in ("met", "not met") for v in g.values())


def test_goals_without_their_numbers_are_not_measured() -> None:
    g = {x["goal"]: x["status"] for x in goals.evaluate(None, {})}
    assert set(g.values()) == {"not measured"} and len(g) == 5
    # one concurrency measured and fine: not yet known; one measured and below: already not met
    ok1 = {"bench-c1": _run({}, {"cosine/autoregressive@1": 1.4})}
    low1 = {"bench-c1": _run({}, {"cosine/autoregressive@1": 0.8})}
    assert {x["goal"]: x["status"] for x in goals.evaluate(None, ok1)}["never-below-autoregressive"] == "not measured"
    assert {x["goal"]: x["status"] for x in goals.evaluate(None, low1)}["never-below-autoregressive"] == "not met"


def test_lossless_flags_any_mismatch() -> None:
    assert goals.lossless({})["status"] == "not measured"
    runs = {"bench-c1": _run({}, {}), "routing-2": _run({}, {}, [["cosine", "def f"]])}
    ll = goals.lossless(runs)
    assert ll["status"] == "MISMATCH" and list(ll["mismatches"]) == ["routing-2"] and ll["outputs_compared"] == 16


def test_node_placement_is_read_from_onnxruntimes_report() -> None:
    placement = load_tool("placement")
    log = ("2026 [V:onnxruntime:, session_state.cc:1598 VerifyEachNodeIsAssignedToAnEp] Node placements\n"
           "2026 [V:onnxruntime:, session_state.cc:1601 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
           "[CUDAExecutionProvider]. Number of nodes: 300\n"
           "2026 [V:onnxruntime:, session_state.cc:1605 VerifyEachNodeIsAssignedToAnEp]   MatMul (m0)\n"
           "2026 [V:onnxruntime:, session_state.cc:1601 VerifyEachNodeIsAssignedToAnEp]  Node(s) placed on "
           "[CPUExecutionProvider]. Number of nodes: 2\n"
           "2026 [V:onnxruntime:, session_state.cc:1605 VerifyEachNodeIsAssignedToAnEp]   RotaryEmbedding (r0)\n"
           "2026 [V:onnxruntime:, session_state.cc:1605 VerifyEachNodeIsAssignedToAnEp]   Shape (s0)\n")
    got = placement.parse(log)
    assert got["placements"] == {"CUDAExecutionProvider": 300, "CPUExecutionProvider": 2}
    assert got["nodes"]["CPUExecutionProvider"] == ["RotaryEmbedding", "Shape"]
    assert placement.parse("... All nodes placed on [CPUExecutionProvider]. Number of nodes: 58")["placements"] == \
        {"CPUExecutionProvider": 58}


# ---------------------------------------------------------------- a failing step does not stop the run

def test_failed_and_overrunning_steps_are_recorded_and_the_run_goes_on(tmp_path: Path) -> None:
    host = hostenv.Host(tmp_path / "work", tmp_path / "carry", rehearse=True)
    for job in pipeline.JOBS:
        host.mark(job, "ok")
    r = steps.Runner(host, budget_s=300.0, out=tmp_path / "out")
    py = sys.executable
    t0 = time.monotonic()
    r.step("bench-c1", ("target",), lambda limit: [py, "-c", "import sys; print('boom'); sys.exit(3)"])
    r.step("routing-2", ("target",), lambda limit: (_ for _ in ()).throw(RuntimeError("no config")))
    host.mark("ngram", "failed", "exit 1: corpus missing")
    r.step("routing-3", ("ngram",), lambda limit: [py, "-c", "pass"])
    r.step("cuda-graph", ("target",), lambda limit: [py, "-c", "pass"])
    # an overrun: a budget of a few seconds is the step's limit; the process group is stopped there
    quick = plan.Speeds(decode_b1_ms=0.1, decode_b16_ms=0.1, overhead_ms=0.0, cluster_start_s=0.1, hf_tok_s=1e4,
                        peer_load_s=0.0)
    r.t_end = time.monotonic() + steps.RESERVE_S + 3.0
    r.profile = dataclasses.replace(plan.REHEARSAL, guess=quick)
    r.speeds = quick
    r.step("bench-c16", ("target",), lambda limit: [py, "-c", "import time; time.sleep(600)"])
    got = {x["name"]: x for x in json.loads((host.runs / "steps.json").read_text())}
    assert got["bench-c1"]["status"] == "failed" and "exit 3" in got["bench-c1"]["detail"]
    assert "boom" in got["bench-c1"]["detail"]
    assert got["routing-2"]["status"] == "failed" and "no config" in got["routing-2"]["detail"]
    assert got["routing-3"]["status"] == "skipped" and "ngram failed" in got["routing-3"]["detail"]
    assert got["cuda-graph"]["status"] == "ok"
    assert got["bench-c16"]["status"] == "timed out"
    assert time.monotonic() - t0 < 60  # the overrun was stopped at its limit, not left to finish
    assert {p.name for p in (tmp_path / "out").iterdir()} >= {"summary.json", "summary.md", "results.tar.gz"}


def test_processes_left_behind_by_a_step_are_stopped(tmp_path: Path) -> None:
    marker = str(tmp_path / "runs" / "bench-c1" / "config.toml")
    p = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", marker], start_new_session=True)
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)", "unrelated"])
    try:
        assert hostenv.reap(marker, grace_s=5.0) == [p.pid]
        assert p.wait(timeout=10) != 0 and other.poll() is None
    finally:
        other.kill()
        other.wait()


def test_a_step_the_budget_cannot_hold_is_skipped_saying_so(tmp_path: Path) -> None:
    host = hostenv.Host(tmp_path / "work", tmp_path / "carry", rehearse=True)
    for job in pipeline.JOBS:
        host.mark(job, "ok")
    r = steps.Runner(host, budget_s=steps.RESERVE_S + 5.0, out=None)
    assert not r.step("bench-c1", ("target",), lambda limit: [sys.executable, "-c", "pass"])
    rec = r.records[-1]
    assert rec["status"] == "skipped" and rec["detail"].startswith("budget:")
    assert json.loads((host.runs / "summary.json").read_text())["steps"][-1]["status"] == "skipped"


@pytest.mark.parametrize("name", ["measure.sh", "stage.sh"])
def test_scripts_explain_themselves(name: str) -> None:
    r = subprocess.run(["bash", str(TOOLS / name), "--help"], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert r.returncode == 0 and "docs/gpu.md" in (r.stdout + r.stderr)


def test_the_source_links_survive_two_processes_making_them_at_once(tmp_path: Path) -> None:
    # On a fresh host the background preparation and `run` link the source at the same
    # moment; CI once failed there with EEXIST. Race several processes, several rounds.
    code = ("import sys, time; sys.path.insert(0, sys.argv[1]); import hostenv; from pathlib import Path; "
            "time.sleep(max(0.0, float(sys.argv[3]) - time.time())); "  # all start together
            "hostenv.Host(Path(sys.argv[2]), Path(sys.argv[2]) / 'carry', rehearse=True).link_source()")
    for round_ in range(3):
        work, start = tmp_path / f"w{round_}", str(time.time() + 1.5)
        procs = [subprocess.Popen([sys.executable, "-c", code, str(TOOLS), str(work), start], stderr=subprocess.PIPE)
                 for _ in range(6)]
        errors = [p.communicate()[1].decode() for p in procs if p.wait() != 0]
        assert not errors, errors[0]
        pkg = work / "src" / "cosine"
        assert (pkg / "control").resolve() == ROOT / "control" and (pkg / "bench" / "__init__.py").is_file()
        assert not list(pkg.glob(".*.tmp"))
