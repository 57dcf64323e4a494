"""Greedy exactness end to end: every mode gives token for token the autoregressive output
(real worker processes, real sockets on loopback)."""

from __future__ import annotations

import asyncio
import threading

import pytest

from cosine.client import AsyncClient, Client

MODES = ("speculative", "specinfer", "cosine")
PROMPTS = [[5, 17, 12, 8, 9], [3], [20, 21, 22, 7, 7, 7, 7, 1, 14, 12, 30, 31]]


@pytest.fixture(scope="module")
def reference(control_cluster) -> dict[int, list[int]]:
    with Client(control_cluster.endpoint, timeout_s=60) as c:
        return {i: c.generate(p, max_tokens=24, mode="autoregressive").token_ids for i, p in enumerate(PROMPTS)}


@pytest.mark.parametrize("mode", MODES)
def test_modes_match_autoregressive(control_cluster, reference, mode):
    with Client(control_cluster.endpoint, timeout_s=60) as c:
        for i, p in enumerate(PROMPTS):
            r = c.generate(p, max_tokens=24, mode=mode)
            assert r.token_ids == reference[i], (mode, i)
            assert r.stats["rounds"] >= 1 and r.stats["mean_accepted_length"] >= 1.0
            if len(r.token_ids) == 24:
                assert r.finish_reason == "length"


def test_text_prompt_all_modes_agree(control_cluster):
    with Client(control_cluster.endpoint, timeout_s=60) as c:
        outs = {m: c.generate("hello world", max_tokens=16, mode=m) for m in ("autoregressive",) + MODES}
    ref = outs["autoregressive"]
    for m, r in outs.items():
        assert r.token_ids == ref.token_ids and r.text == ref.text, m


def test_perfect_drafter_is_accepted(control_cluster):
    """The target's own engine drafts: in speculative mode every draft is accepted (draft_len
    4 -> 5 tokens per round); cosine, fusing it with a poor drafter, still accepts drafts."""
    with Client(control_cluster.endpoint, timeout_s=60) as c:
        spec = c.generate(PROMPTS[0], max_tokens=48, mode="speculative")
        cos = c.generate(PROMPTS[0], max_tokens=48, mode="cosine")
    n = spec.stats["tokens"]
    assert spec.stats["rounds"] <= -(-n // 5) + 1 and spec.stats["drafters_used"] == ["good"], spec.stats
    assert cos.stats["mean_accepted_length"] > 1.3, cos.stats
    assert set(cos.stats["drafters_used"]) <= {"good", "poor"} and cos.stats["drafters_used"]


def test_concurrent_requests_threads(control_cluster, reference):
    """Continuous batching: threads with their own clients, mixed modes, all exact."""
    errors: list[str] = []

    def run(k: int) -> None:
        mode = ("autoregressive",) + MODES
        try:
            with Client(control_cluster.endpoint, timeout_s=120) as c:
                for j in range(3):
                    i = (k + j) % len(PROMPTS)
                    r = c.generate(PROMPTS[i], max_tokens=24, mode=mode[(k + j) % 4])
                    if r.token_ids != reference[i]:
                        errors.append(f"thread {k} prompt {i} mode {mode[(k + j) % 4]}: {r.token_ids} != {reference[i]}")
        except Exception as e:  # noqa: BLE001
            errors.append(f"thread {k}: {e!r}")

    threads = [threading.Thread(target=run, args=(k,)) for k in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(180)
    assert not errors, errors


def test_pipelining_overlaps_and_stats(control_cluster, reference):
    """Concurrent cosine requests: drafting of one group overlaps verification of the other."""
    async def many():
        async with AsyncClient(control_cluster.endpoint, timeout_s=60) as ac:
            before = (await ac.stats())["pipeline_overlap_s"]
            rs = await asyncio.gather(*[ac.generate(PROMPTS[i % 3], max_tokens=24, mode="cosine") for i in range(8)])
            return before, rs

    before, rs = asyncio.run(many())
    assert all(r.token_ids == reference[i % 3] for i, r in enumerate(rs))
    with Client(control_cluster.endpoint, timeout_s=60) as c:
        s = c.stats()
    assert s["pipeline_overlap_s"] > before
    assert s["rounds"] > 0 and s["tokens"] > 0
    assert 0.0 <= s["verifier_idle_frac"] <= 1.0
    assert 0.0 <= s["drafter_idle_frac"] <= 1.0
    assert set(s["drafters"]) == {"good", "poor"}
    assert "verifier-0" in s["workers"] and "requests_held" in s["workers"]["verifier-0"]
    # fusion's calibration learned from the verified candidates, per domain and drafter
    cal = s["calibration"]
    assert cal and all(set(per) <= {"good", "poor"} for per in cal.values())
    assert sum(n for per in cal.values() for bins in per.values() for _, n in bins) > 0


def test_measured_gate_tries_both_regimes_and_stays_exact(control_engines, tmp_path, reference):
    """gate = "measured": the batch gate times real rounds of speculation and of plain
    decoding (windows of 2 rounds, exploring every 2nd) and every output is still exact."""
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               sections={"speculation": {"gate": "measured", "gate_window": 2,
                                                         "gate_explore_every": 2}})
    with LocalCluster(cfg) as cl, Client(cl.endpoint, timeout_s=60) as c:
        for i, p in enumerate(PROMPTS):
            assert c.generate(p, max_tokens=24, mode="cosine").token_ids == reference[i], i
        st = c.stats()
    assert set(st["gate_goodput"]) == {"1:spec", "1:plain"}, st["gate_goodput"]
    assert all(v > 0 for v in st["gate_goodput"].values())
    assert 0 < st["gated_rounds"] < st["rounds"]


def test_prefill_is_chunked_across_ticks(control_engines, tmp_path, reference):
    """max_prefill_tokens caps one admission prefill op: a burst of requests is admitted over
    several ticks (at least one request per op) and every output is still exact."""
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"], {"poor": control_engines["poor"]},
                               sections={"scheduling": {"max_prefill_tokens": 6}})
    out: dict[int, list[int]] = {}

    def run(i: int) -> None:
        with Client(cl.endpoint, timeout_s=60) as c:
            out[i] = c.generate(PROMPTS[i % len(PROMPTS)], max_tokens=24, mode="cosine").token_ids

    with LocalCluster(cfg) as cl:
        ts = [threading.Thread(target=run, args=(i,)) for i in range(6)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        with Client(cl.endpoint) as c:
            prefills = c.stats()["workers"]["verifier-0"]["steps"]["prefill"]
    assert {i: out[i] for i in range(6)} == {i: reference[i % len(PROMPTS)] for i in range(6)}
    # start-up profile + 6 requests of 5, 1 and 12 tokens under a 6-token cap: >= 3 more ops
    assert prefills >= 4


def test_unpipelined_with_a_drafter_context_window_stays_exact(control_engines, tmp_path, reference):
    """pipeline = "off" (the rule on a shared host) drafts then verifies every cosine request
    in turn; a drafter that sees only the last 8 prompt tokens (draft_context) still drafts
    well enough to be accepted, and every mode stays token for token exact."""
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               controller={"pipeline": "off"}, model_extra={"good": {"draft_context": 8}})
    with LocalCluster(cfg) as cl, Client(cl.endpoint, timeout_s=60) as c:
        for mode in MODES:
            for i, p in enumerate(PROMPTS):
                assert c.generate(p, max_tokens=24, mode=mode).token_ids == reference[i], (mode, i)
        spec = c.generate(PROMPTS[2], max_tokens=24, mode="speculative")
        st = c.stats()
    assert not st["pipelined"] and st["pipeline_overlap_s"] == 0.0
    assert spec.stats["mean_accepted_length"] > 2.0, spec.stats  # the windowed drafter is still useful


def test_pruned_trees_stay_exact(control_engines, tmp_path, reference):
    """min_gain = 0.3: fused drafting stops early and the poor drafter's nodes, once
    calibration has seen them fail, are dropped before verification; outputs stay exact."""
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               sections={"speculation": {"min_gain": 0.3}})
    with LocalCluster(cfg) as cl, Client(cl.endpoint, timeout_s=60) as c:
        for _ in range(2):
            for i, p in enumerate(PROMPTS):
                r = c.generate(p, max_tokens=24, mode="cosine", drafters=["good", "poor"])
                assert r.token_ids == reference[i], i
        st = c.stats()
    assert st["pruned_nodes"] > 0, st
    assert st["mean_accepted_length"] > 1.5, st


def test_solo_chains_stopped_by_the_drafter_stay_exact(control_engines, tmp_path, reference):
    """A cosine request routed to one model drafter drafts its chain in one op; with
    min_gain = 0.6 the drafter ends the chain itself once its tokens' probability product
    falls below the step floor (workers: min_reach). Outputs stay exact, chains did stop
    early, and the drafter's cache stays in step (the next rounds still accept drafts)."""
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"good": control_engines["target"], "poor": control_engines["poor"]},
                               sections={"speculation": {"min_gain": 0.6}})
    lengths = []
    with LocalCluster(cfg) as cl, Client(cl.endpoint, timeout_s=60) as c:
        for drafter in ("poor", "good"):
            for i, p in enumerate(PROMPTS):
                r = c.generate(p, max_tokens=24, mode="cosine", drafters=[drafter])
                assert r.token_ids == reference[i], (drafter, i)
                if drafter == "good":
                    lengths.append(r.stats["mean_accepted_length"])
        st = c.stats()
    assert st["stopped_chains"] > 0 and st["refused_drafts"] == 0, st
    # "good" is the target itself: with its cache in step every drafted token is accepted
    assert min(lengths) >= 2.0, lengths


def test_background_prefill_stays_exact(control_engines, tmp_path, reference):
    """background_prefill = "on": a model drafter prefills each new cosine prompt in a
    background op while the first rounds verify with the prompt-lookup drafter's drafts.
    Concurrent cosine and speculative requests stay token for token exact, every cosine
    request is prefilled that way once, and the model drafter joins afterwards."""
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"lookup": ("lookup", None), "good": control_engines["target"]},
                               controller={"background_prefill": "on"})
    jobs = [(i, mode) for mode in ("cosine", "speculative") for i in range(len(PROMPTS))]

    async def run_all() -> list:
        async with AsyncClient(cfg_endpoint, timeout_s=120) as ac:
            return await asyncio.gather(*(ac.generate(PROMPTS[i], max_tokens=24, mode=m) for i, m in jobs))

    with LocalCluster(cfg) as cl:
        cfg_endpoint = cl.endpoint
        outs = asyncio.run(run_all())
        with Client(cl.endpoint, timeout_s=60) as c:
            alone = c.generate(PROMPTS[2], max_tokens=24, mode="cosine")
            st = c.stats()
    assert [o.token_ids for o in outs] == [reference[i] for i, _ in jobs]
    assert alone.token_ids == reference[2]
    assert st["background_prefills"] == len(PROMPTS) + 1, st  # the cosine requests, once each
    assert "good" in alone.stats["drafters_used"], alone.stats


@pytest.mark.parametrize("gate", ["off", "model"])
def test_model_drafter_waits_while_the_batch_gate_keeps_requests_plain(control_engines, tmp_path, gate):
    """Four concurrent cosine requests. With the batch gate off, the model drafter prefills
    every prompt in the background. With a gate that keeps the batch plain (speculation
    must beat plain decoding 1000x), engaging it waits: at most a request admitted before
    the others arrive, alone, is prefilled, and every output stays exact."""
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"lookup": ("lookup", None), "good": control_engines["target"]},
                               controller={"background_prefill": "on"},
                               sections={"speculation": {"gate": gate, "disable_below_ratio": 1000.0}})

    async def run_all(endpoint: str) -> list:
        async with AsyncClient(endpoint, timeout_s=120) as ac:
            return await asyncio.gather(*(ac.generate(PROMPTS[0], max_tokens=16, mode=m, ignore_eos=True)
                                          for m in ("autoregressive",) + ("cosine",) * 4))

    with LocalCluster(cfg) as cl:
        ref, *outs = asyncio.run(run_all(cl.endpoint))
        with Client(cl.endpoint, timeout_s=60) as c:
            st = c.stats()
    assert all(o.token_ids == ref.token_ids for o in outs)
    if gate == "off":
        assert st["background_prefills"] == 4, st
    else:
        assert st["gated_rounds"] > 0 and st["background_prefills"] <= 1, st


def test_a_burst_is_admitted_before_any_round(control_engines, tmp_path):
    """Three cosine requests arrive while the first one's admission prefill runs (the
    verifier held with SIGSTOP). The tick that admitted the first ends there, so the next
    admits the other three before any round is planned: no request ever runs alone, and
    with a gate that keeps batches plain the model drafter prefills nothing. (The first
    request used to run its first round alone and engage the model drafter.)"""
    import signal

    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"lookup": ("lookup", None), "good": control_engines["target"]},
                               controller={"background_prefill": "on", "worker_timeout_s": 15.0},
                               sections={"speculation": {"gate": "model", "disable_below_ratio": 1000.0}})

    async def burst(endpoint: str, verifier) -> list:
        async with AsyncClient(endpoint, timeout_s=60) as ac:
            run = lambda i: asyncio.ensure_future(  # noqa: E731
                ac.generate(PROMPTS[i % 3], max_tokens=16, mode="cosine", ignore_eos=True))
            verifier.send_signal(signal.SIGSTOP)
            try:
                first = run(0)
                await asyncio.sleep(0.5)  # its admission prefill now waits on the verifier
                rest = [run(i) for i in (1, 2, 3)]
                await asyncio.sleep(0.5)  # they wait in the controller's inbox
            finally:
                verifier.send_signal(signal.SIGCONT)
            return await asyncio.gather(first, *rest)

    with LocalCluster(cfg) as cl:
        outs = asyncio.run(burst(cl.endpoint, cl.workers["verifier-0"].proc))
        with Client(cl.endpoint, timeout_s=60) as c:
            refs = [c.generate(PROMPTS[i % 3], max_tokens=16, mode="autoregressive", ignore_eos=True)
                    for i in range(4)]
            st = c.stats()
    assert [o.token_ids for o in outs] == [r.token_ids for r in refs]
    assert st["gated_rounds"] > 0 and st["background_prefills"] == 0, st


def test_cost_engaged_model_drafter_stays_exact(control_engines, tmp_path, reference):
    """engage_by_cost on: a request starts with the weight-free lookup drafter, the model
    drafter is probed once its domain has a weight-free baseline, then engaged or not by
    goodput; outputs stay exact either way and the evidence shows in the stats."""
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"lookup": ("lookup", None), "good": control_engines["target"]},
                               sections={"routing": {"engage_by_cost": True}})
    with LocalCluster(cfg) as cl, Client(cl.endpoint, timeout_s=60) as c:
        outs = [c.generate(p, max_tokens=24, mode="cosine") for _ in range(2) for p in PROMPTS]
        st = c.stats()
    assert [o.token_ids for o in outs] == [reference[i] for _ in range(2) for i in range(len(PROMPTS))]
    arms = {arm for per in st["engagement"].values() for arm in per}
    assert arms == {"free", "good"}, st["engagement"]  # the baseline, then the probe


def test_concurrent_cosine_with_default_policies_stays_exact(control_engines, tmp_path, reference):
    """The shipped policies together, as config.toml runs them: the model batch gate,
    pruning by gain, the per-request off-switch and cost-based engagement, with a
    weight-free and two model drafters. Waves of concurrent cosine requests, some arriving
    while others run, all stay exact and none fails. (Pricing nodes for a request the gate
    kept plain once raised an internal error in the controller round; a concurrency-4
    benchmark found it. That path depends on engagement timing and is pinned by
    tests/test_speculation.py; this test guards the combination.)"""
    from cosine.config import SpeculationConfig
    from cosine.control.cluster import LocalCluster
    from tests.conftest import write_cluster_config

    defaults = SpeculationConfig()
    cfg = write_cluster_config(
        tmp_path / "config.toml", control_engines["target"],
        {"lookup": ("lookup", None), "good": control_engines["target"], "poor": control_engines["poor"]},
        sections={"speculation": {"gate": "model", "prune": True,
                                  "disable_below_ratio": defaults.disable_below_ratio},
                  "routing": {"engage_by_cost": True}})
    jobs = [i % len(PROMPTS) for i in range(8)]

    async def run_all(endpoint: str) -> list:
        async with AsyncClient(endpoint, timeout_s=120) as ac:
            async def late(i: int, delay: float):
                await asyncio.sleep(delay)
                return await ac.generate(PROMPTS[i], max_tokens=24, mode="cosine")
            return await asyncio.gather(*(late(i, 0.05 * k * (k % 2)) for k, i in enumerate(jobs)))

    with LocalCluster(cfg) as cl:
        first = asyncio.run(run_all(cl.endpoint))
        second = asyncio.run(run_all(cl.endpoint))  # now with learned priors and measured costs
        with Client(cl.endpoint, timeout_s=60) as c:
            st = c.stats()
    for outs in (first, second):
        assert [o.token_ids for o in outs] == [reference[i] for i in jobs]
    assert st["requests_failed"] == 0, st
    # the gate did weigh these batches (48-74 of about 340 rounds plain in trial runs) and
    # cost-based engagement did engage the model drafters
    assert st["gated_rounds"] > 0 and st["engagement"], st
