"""The control core in-process: ControlCore.step() against fake workers with scripted
replies (tests/fake_workers.py), the router and fuser driven inline (ports.Inline).
Admission, planning, the gate's back-off, chain and fused drafting, and commit, without
threads, sockets or engines; the whole file runs in a few seconds. The same core behind
its actors and real workers: tests/test_control_greedy.py and tests/test_e2e_*.py."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from conftest import write_cluster_config
from fake_workers import FakeDrafter, FakeVerifier, autoregressive, lookup, perfect, poor

from cosine.config import load
from cosine.control.admission import VerifierSlot
from cosine.control.core import ControlCore
from cosine.control.costs import CostBook
from cosine.control.drafting.domains import KeywordClassifier
from cosine.control.drafting.drafters import DrafterSlot
from cosine.control.drafting.fuser import Fuser
from cosine.control.drafting.routing import DrafterInfo, Router
from cosine.control.planning import BatchGate
from cosine.control.ports import Inline
from cosine.control.proxies import DrafterProxy, VerifierProxy
from cosine.control.request import Detokenizer, GenParams, Mode, Request
from cosine.control.speculation import OFF, DraftPlan, SpeculationController
from cosine.control.stats import ControllerStats
from cosine.control.wire import CancelReply, Chunk, Done, Failed
from cosine.workers.client import WorkerError

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


class Harness:
    """A ControlCore over fake workers; ``events`` collects what it emits."""

    def __init__(self, tmp_path: Path, drafters: dict[str, Any], controller: dict[str, Any] | None = None,
                 sections: dict[str, dict[str, Any]] | None = None, kv_budget: int | None = None):
        engines = {n: (Path("/fake") / n if kind == "neural" else (kind, None)) for n, (kind, _) in drafters.items()}
        path = write_cluster_config(tmp_path / "config.toml", Path("/fake/target"), engines, controller=controller,
                                    sections=sections)
        if kv_budget is not None:
            path.write_text(path.read_text().replace('name = "verifier-0"',
                                                     f'name = "verifier-0"\nkv_budget_tokens = {kv_budget}'))
        cfg = load(path, check_engines=False)
        self.verifier = FakeVerifier()
        self.drafters = {n: FakeDrafter(propose) for n, (_, propose) in drafters.items()}
        vslots = [VerifierSlot("verifier-0", Inline(VerifierProxy("verifier-0", "fake", 1.0,
                                                                  connect=lambda: self.verifier)))]
        dslots = [DrafterSlot(n, i, Inline(DrafterProxy(n, "fake", 1.0, connect=lambda w=w: w)), 1 << 20,
                              tuple(cfg.model(cfg.worker(n).model).domains))
                  for i, (n, w) in enumerate(self.drafters.items())]
        infos = [DrafterInfo(d.name, d.domains, d.name in cfg.model_drafters()) for d in dslots]
        self.router = Router.from_config(infos, cfg.controller.routing, classifier=KeywordClassifier(), seed=0)
        self.fuser = Fuser(cfg.controller.fusion.rule, cfg.controller.fusion.min_confidence,
                           cfg.controller.fusion.calibrate)
        self.events: list[Any] = []
        self.core = ControlCore(cfg, vslots, dslots, Inline(self.router), Inline(self.fuser), self.events.append)
        self.n = 0

    def submit(self, prompt: list[int] = PROMPT, **params: Any) -> Request:
        self.n += 1
        p = GenParams(**{"max_tokens": 12, **params})
        r = Request(rid=f"s.{self.n}", client=("ident", f"c{self.n}", self.n), prompt=list(prompt), params=p,
                    eos=frozenset(), context_limit=1 << 20, detok=Detokenizer(lambda ids: "".join(chr(65 + i) for i in ids),
                                                                           prompt))
        assert self.core.submit(r, ("ident", f"c{self.n}"))
        return r

    def run(self, limit: int = 200) -> int:
        """Step until no request is left; returns the rounds it took."""
        for i in range(limit):
            if not self.core.busy:
                return i
            self.core.step()
        raise AssertionError(f"still busy after {limit} rounds: {self.core.requests}")

    def done(self, r: Request) -> Done:
        (d,) = [e for e in self.events if isinstance(e, Done) and e.to == r.client]
        return d


def drafters(*names: str) -> dict[str, Any]:
    table = {"good": ("neural", perfect), "poor": ("neural", poor), "lookup": ("lookup", lookup)}
    return {n: table[n] for n in names}


@pytest.mark.parametrize("pipeline", ["on", "off"])
@pytest.mark.parametrize("mode", list(Mode))
def test_every_mode_commits_the_targets_greedy_tokens(tmp_path: Path, mode: Mode, pipeline: str) -> None:
    h = Harness(tmp_path, drafters("poor", "good", "lookup"), controller={"pipeline": pipeline})
    reqs = [h.submit(mode=mode, max_tokens=10 + i) for i in range(3)]
    h.run()
    for r in reqs:
        assert h.done(r).token_ids == autoregressive(PROMPT, r.params.max_tokens), mode
    if mode is not Mode.AUTOREGRESSIVE:
        assert h.core.stats_.accepted_drafts > 0
    assert not h.core.requests and not h.core.waiting and not h.verifier.cache  # all released
    assert not h.router.active and not any(d.cache for d in h.drafters.values())


def test_admission_waits_for_kv_room_and_admits_in_order(tmp_path: Path) -> None:
    # each request's worst case: 8 prompt + 12 output + 64 tree nodes = 84 tokens
    h = Harness(tmp_path, drafters("good"), kv_budget=100)
    a, b = h.submit(), h.submit()
    h.core.step()  # admits a only: b does not fit beside it
    assert list(h.core.requests) == [a.rid] and [r.rid for r in h.core.incoming] == [b.rid]
    assert h.core.stats_.queue_waits == 1 and h.verifier.cache[a.rid] == PROMPT[:-1]
    h.run()
    assert h.done(a).token_ids == h.done(b).token_ids == autoregressive(PROMPT, 12)


def test_prefill_refused_for_room_waits_and_other_refusals_fail(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good"))
    a = h.submit()
    h.core.step()                                   # a is admitted alone
    h.verifier.fail("prefill", WorkerError("capacity", "no room"))
    b = h.submit()
    h.core.step()                                   # the worker has less room than reserved: b waits
    assert b in h.core.incoming and not [e for e in h.events if isinstance(e, Failed)]
    h.core.step()                                   # now it is admitted
    assert b.rid in h.core.requests
    h.verifier.fail("prefill", WorkerError("too_long", "over the context"))
    c = h.submit()
    h.run()
    assert h.done(a).token_ids == h.done(b).token_ids == autoregressive(PROMPT, 12)
    (f,) = [e for e in h.events if isinstance(e, Failed)]
    assert f.to == c.client and f.code == "too_long" and "prefill on verifier verifier-0" in f.message
    assert c.rid not in h.router.active  # classified while it prefilled, then forgotten


@pytest.mark.parametrize("pipeline", ["on", "off"])
def test_verify_failures_map_to_client_codes(tmp_path: Path, pipeline: str) -> None:
    h = Harness(tmp_path, drafters("good"), controller={"pipeline": pipeline})
    a = h.submit()
    h.verifier.fail("verify", WorkerError("too_long", "past the engine's context"))
    h.run()
    (f,) = [e for e in h.events if isinstance(e, Failed)]
    assert (f.to, f.code) == (a.client, "too_long") and "verification on verifier-0" in f.message
    assert not h.core.requests and not h.verifier.cache  # (a dead verifier parks instead: tests below)


def test_a_refused_verify_batch_is_retried_one_by_one(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good"), controller={"pipeline": "off"})
    b, c = h.submit(), h.submit()
    h.core.step()
    h.verifier.fail("verify", WorkerError("bad_request", "one bad tree"))  # the batch of both is refused
    h.core.step()
    assert h.verifier.calls["verify"] == 3 and b.rounds == c.rounds == 1
    h.verifier.fail("verify", WorkerError("capacity", "no room"), times=3)  # the retries fail too: overloaded
    h.core.step()
    assert [(e.to, e.code) for e in h.events if isinstance(e, Failed)] == [(b.client, "overloaded"),
                                                                           (c.client, "overloaded")]


def test_planning_mode_table_and_caps(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good", "poor"), sections={"speculation": {"draft_len": 6}},
                controller={"pipeline": "off"})
    reqs = {m: h.submit(mode=m, max_tokens=4) for m in Mode}
    h.core.step()  # admission
    plans = h.core.planner.plan(list(h.core.requests.values()), len(h.core.requests))
    assert plans[reqs[Mode.AUTOREGRESSIVE].rid] == DraftPlan(False, 0, 1)
    # a fixed draft of 6, cut to the 4 tokens the request may still produce
    assert plans[reqs[Mode.SPECULATIVE].rid] == DraftPlan(True, 4, 1)
    assert plans[reqs[Mode.SPECINFER].rid] == DraftPlan(True, 4, 1)
    cos = plans[reqs[Mode.COSINE].rid]  # the speculation controller's first plan: draft_len
    assert cos.speculate and 1 <= cos.draft_len <= 4
    r = h.submit(mode=Mode.SPECULATIVE, max_tokens=100, drafters=("poor",))
    h.core.step()
    h.core.drafters.by_name["poor"].alive = False  # its pinned drafter died: plain decoding
    assert h.core.planner.plan([r], 1)[r.rid] == DraftPlan(False, 0, 1)


def test_gate_backs_off_probes_of_requests_it_keeps_plain(tmp_path: Path) -> None:
    cfg = load(write_cluster_config(tmp_path / "c.toml", Path("/fake/t"), {"good": Path("/fake/g")},
                                    sections={"speculation": {"gate": "model", "disable_below_ratio": 0.9}}),
               check_engines=False)
    costs = CostBook(draft_step_s=10.0)  # drafting costs far more than it saves: the gate says plain
    costs.observe_plain_step(0.01)
    spec = SpeculationController.from_config(cfg.controller.speculation, 256, probe_every=2, costs=costs)
    stats = ControllerStats()
    gate = BatchGate(cfg.controller.speculation, spec, costs, stats)
    reqs = [Request(rid=f"r{i}", client=None, prompt=[1, 2, 3], params=GenParams(max_tokens=50), eos=frozenset(),
                    context_limit=1000, detok=Detokenizer(str, []), drafted=True) for i in range(2)]
    probes = []
    for rnd in range(1, 40):
        out = gate.apply(reqs, {r.rid: DraftPlan(True, 4, 1) for r in reqs}, 1, len(reqs))
        assert gate.batch_plain
        if out["r0"] != OFF:
            probes.append(rnd)
    # a probe after 2 gated rounds, then the wait doubles up to 8 x probe_every
    assert probes == [2, 6, 14, 30, 46][:len(probes)] and len(probes) == 4, probes
    assert stats.gated_rounds == 39
    reqs[1].drafted = False  # a request that never drafted has nothing to refresh: never probed
    gate.forget("r1")
    assert all(gate.apply(reqs, {"r1": DraftPlan(True, 4, 1), "r0": DraftPlan(True, 4, 1)}, 1, 2)["r1"] == OFF
               for _ in range(20))


def test_routed_solo_chain_labels_its_candidates(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good", "poor"), controller={"pipeline": "off"},
                sections={"routing": {"max_drafters_per_request": 1}})
    r = h.submit(max_tokens=20)
    h.core.step()
    h.core.step()
    assert h.core.stats_.rounds == 1
    scores = h.router.scores(r.rid)
    assert scores["good"] != scores["poor"]  # the routed drafter's labels updated its score
    assert h.core.stats_.accepted_drafts > 0 and h.fuser.calibration_table()  # labels taught calibration
    h.run()
    assert h.done(r).token_ids == autoregressive(PROMPT, 20)
    assert h.drafters["good"].calls["draft"] + h.drafters["poor"].calls["draft"] >= 2


def test_fused_drafting_builds_one_tree_of_every_routed_drafter(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good", "poor", "lookup"), controller={"pipeline": "off"},
                sections={"routing": {"max_drafters_per_request": 3, "min_score_ratio": 0.0},
                          "speculation": {"prune": False, "adaptive": False}})
    r = h.submit(max_tokens=30)
    h.core.step()
    plans = h.core.planner.plan([r], 1)
    drafts, _ = h.core.drafting.draft([r], plans, 1)
    d = drafts[r.rid]
    assert len(d.routed) >= 2 and d.drafters == d.routed
    proposers = {int(p) for p in d.tree.proposers[1:]}
    assert len(proposers) >= 2  # candidates of several drafters in one tree
    assert {p.drafter for p in d.labels} == proposers and all(0 <= p.parent < d.tree.n for p in d.labels)
    h.run()
    assert h.done(r).token_ids == autoregressive(PROMPT, 30)
    assert h.core.stats_.guided_steps > 0  # the lookup chain guided the model drafters' ops


def test_a_round_without_proposals_is_rescued_by_a_spare_model_drafter(tmp_path: Path) -> None:
    # two requests: no anchor, so the tied scores route each to the first drafter, lookup,
    # which has nothing to propose at every fifth position
    h = Harness(tmp_path, drafters("lookup", "good"), controller={"pipeline": "off"},
                sections={"routing": {"max_drafters_per_request": 1}})
    reqs = [h.submit(max_tokens=30) for _ in range(2)]
    h.run()
    assert h.core.stats_.rescued_rounds > 0 and h.drafters["good"].calls["draft"] > 0
    for r in reqs:
        assert h.done(r).token_ids == autoregressive(PROMPT, 30)


def test_commit_streams_chunks_that_add_up_to_done(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good", "lookup"))
    r = h.submit(max_tokens=15, stream=True, stop=(chr(65 + autoregressive(PROMPT, 15)[9]),))
    h.run()
    chunks = [e for e in h.events if isinstance(e, Chunk)]
    done = h.done(r)
    assert len(chunks) > 1 and "".join(c.text for c in chunks) == done.text
    assert [t for c in chunks for t in c.tokens] == done.token_ids
    assert done.finish_reason == "stop" and done.stats["rounds"] == r.rounds


def test_dead_drafter_is_skipped_then_readmitted_after_a_probe(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good"), controller={"pipeline": "off"},
                sections={"speculation": {"adaptive": False}})
    h.drafters["good"].fail("draft", TimeoutError("silent"))
    r = h.submit(max_tokens=40)
    h.core.step()
    h.core.step()
    slot = h.core.drafters.by_name["good"]
    assert not slot.alive and r.rounds == 1 and r.accepted_drafts == 0  # the round went on: a plain step
    h.core.step()
    assert r.rounds == 2 and h.drafters["good"].calls["draft"] == 1  # without it
    slot.next_probe = 0.0
    h.core.step()  # sends the probe
    h.core.step()  # collects it: alive again, its cache counted empty
    assert slot.alive
    h.run()
    assert h.done(r).token_ids == autoregressive(PROMPT, 40) and r.accepted_drafts > 0


def test_cancel_duplicate_and_overload(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good"), controller={"max_pending_requests": 2})
    a = h.submit()
    dup = Request(rid="x", client=("ident", "c1", 9), prompt=PROMPT, params=GenParams(max_tokens=4), eos=frozenset(),
                  context_limit=100, detok=Detokenizer(str, []))
    assert not h.core.submit(dup, ("ident", "c1"))
    h.submit()
    assert not h.core.submit(Request(rid="y", client=("ident", "c9", 9), prompt=PROMPT,
                                     params=GenParams(max_tokens=4), eos=frozenset(), context_limit=100,
                                     detok=Detokenizer(str, [])), ("ident", "c9"))
    h.core.step()
    h.core.cancel(("ident", a.client[1]), ("ident", 50))
    h.core.cancel(("ident", "nobody"), ("ident", 51))
    codes = [(e.code if isinstance(e, Failed) else e.error) for e in h.events if isinstance(e, (Failed, CancelReply))]
    assert codes[:2] == ["duplicate_request", "overloaded"] and "cancelled" in codes
    assert codes[-2] is None and "no running request" in codes[-1]
    h.run()
    assert a.rid not in h.verifier.cache and len([e for e in h.events if isinstance(e, Done)]) == 1


def test_in_process_core_has_no_actor_wait_to_speak_of(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good", "lookup"))
    h.submit(max_tokens=20)
    h.run()
    st = h.core.stats()
    assert st["ticks"] > 0 and st["actor_wait"]["gets_per_round"]["router"] > 0
    assert st["actor_wait"]["per_round_ms"]["router"] < 5.0


def test_a_failing_tell_leaves_its_actor_running() -> None:
    """A Pykka actor stops when a tell raises; the methods the core tells (ports.told) log
    the error instead, so a bad update cannot take the router down with every later round."""
    from cosine.control.actors import RouterActor

    router = Router([DrafterInfo("a"), DrafterInfo("b")], classifier=KeywordClassifier())
    ref = RouterActor.start(router)
    try:
        port = ref.proxy().service
        port.start("r", "x").get(timeout=5)
        port.update_many.defer([("r", "a", 0.5)], [])  # malformed: raises inside the actor
        assert port.select_many([("r", 1, {"a", "b"})]).get(timeout=5) == {"r": ["a"]}
        assert ref.is_alive()
    finally:
        ref.stop()


# -- a verifier that dies or restarts costs no request (issue 23) ---------------------------

@pytest.mark.parametrize("mode", [Mode.AUTOREGRESSIVE, Mode.COSINE])
def test_a_dead_verifier_parks_its_requests_and_they_resume_exactly(tmp_path: Path, mode: Mode) -> None:
    """The verifier stops answering mid-generation (verify and its first probes time out),
    then comes back restarted (empty cache): the requests are parked, prefilled again from
    their committed tokens, and end with exactly the undisturbed greedy output."""
    h = Harness(tmp_path, drafters("good", "lookup"))
    reqs = [h.submit(mode=mode, max_tokens=16 + i) for i in range(2)]
    for _ in range(20):
        if all(r.output for r in reqs):
            break
        h.core.step()
    assert all(r.output for r in reqs) and not any(r.done for r in reqs)
    h.verifier.fail("verify", TimeoutError("no reply"))
    h.verifier.fail("health", TimeoutError("no reply"), times=2)
    h.core.step()
    v = h.core.verifiers[0]
    assert not v.alive and not h.core.requests and all(r.parked_since is not None for r in reqs)
    assert h.core.stats()["parked_requests"] == 2
    h.verifier.cache.clear()  # restarted: holds nothing
    h.verifier.pending.clear()
    h.run(limit=2000)  # probes every second until it answers
    for r in reqs:
        assert h.done(r).token_ids == autoregressive(PROMPT, r.params.max_tokens)
        assert r.resumes == 1
    assert v.alive and h.core.stats_.resumed_requests == 2 and h.verifier.calls["health"] >= 3
    assert not h.verifier.cache and not any(d.cache for d in h.drafters.values())  # all released at the end


def test_a_restarted_verifier_that_lost_the_cache_resumes_at_once(tmp_path: Path) -> None:
    """Restarted between two rounds: its next verify answers unknown_request; the request is
    prefilled again on the same (alive) verifier with no probe and no failure."""
    h = Harness(tmp_path, drafters("good"))
    r = h.submit(max_tokens=20)
    for _ in range(3):
        h.core.step()
    assert r.output and not r.done
    h.verifier.cache.clear()
    h.verifier.pending.clear()
    h.run()
    assert h.done(r).token_ids == autoregressive(PROMPT, 20)
    assert r.resumes == 1 and h.core.verifiers[0].alive and h.verifier.calls["health"] == 0
    assert not [e for e in h.events if isinstance(e, Failed)]


def test_parked_requests_fail_unavailable_after_the_grace(tmp_path: Path) -> None:
    h = Harness(tmp_path, drafters("good"), controller={"verifier_grace_s": 0.2})
    r = h.submit(max_tokens=30)
    for _ in range(2):
        h.core.step()
    h.verifier.fail("verify", TimeoutError("no reply"))
    h.verifier.fail("health", TimeoutError("no reply"), times=1000)
    h.run(limit=200)  # each idle step sleeps 50 ms: the grace passes within a few steps
    (f,) = [e for e in h.events if isinstance(e, Failed)]
    assert f.code == "unavailable" and "verifier-0" in f.message and "verifier_grace_s" in f.message
    assert h.core.stats_.requests_failed == 1 and not h.core.busy
    assert not any(d.cache for d in h.drafters.values())  # the parked request's drafter state is freed too
