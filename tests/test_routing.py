"""Router and domain classifier: pure policies, no I/O."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosine.bench.prompts import BUILTIN
from cosine.config import RoutingConfig
from cosine.control.drafting.domains import (DomainClassifier, KeywordClassifier, NgramClassifier, features, make_classifier,
                                    sample_text)
from cosine.control.drafting.routing import DrafterInfo, Router, harmonic_mean

DRAFTERS = [DrafterInfo("general"), DrafterInfo("coder", ("code",)), DrafterInfo("writer", ("prose", "docs")),
            DrafterInfo("deutsch", ("german",))]


class Fixed:
    def __init__(self, domain: str):
        self.d = domain

    def classify(self, text: str) -> str:
        return self.d


def router(**kw) -> Router:
    kw.setdefault("explore_prob", 0.0)
    return Router(DRAFTERS, **kw)


# -- classifier ------------------------------------------------------------------------
@pytest.mark.parametrize("domain", ["code", "docs", "prose", "german"])
def test_keyword_classifier_builtin_prompts(domain):
    c = KeywordClassifier()
    for p in BUILTIN[domain]:
        assert c.classify(p) == domain, p


def test_keyword_classifier_math_default_and_custom():
    c = KeywordClassifier()
    assert c.classify("|- ( ph -> ( ps -> ph ) ) $.") == "math"
    assert c.classify("Theorem. For every integer n, n + 0 = n. Proof: induction.") == "math"
    assert c.classify("") == "general"
    assert c.classify("zzz qqq") == "general"
    assert isinstance(c, DomainClassifier)
    custom = KeywordClassifier({"sql": ["SELECT", "FROM", "WHERE"], "shell": {"$ ": 2.0, "sudo": 3.0}}, default="x")
    assert custom.classify("SELECT a FROM t WHERE b") == "sql"
    assert custom.classify("select a from t") == "x"  # upper-case markers are case-sensitive
    assert custom.classify("$ sudo apt install") == "shell"


def _language(seed: int, words: list[str]) -> np.ndarray:
    """A seeded Zipf-like word distribution over a shared vocabulary."""
    p = np.random.default_rng(seed).permutation(1.0 / np.arange(1, len(words) + 1))
    return p / p.sum()


def test_ngram_classifier_tells_overlapping_languages_apart(tmp_path):
    """Three "domains" share one vocabulary and differ only in word frequencies (the hard
    case keywords cannot handle): 40-word texts from each go to their own domain."""
    words = [f"w{i}" for i in range(300)]
    rng = np.random.default_rng(0)
    langs = {d: _language(i, words) for i, d in enumerate(("code", "docs", "prose"))}
    corpora = {}
    for d, p in langs.items():
        (tmp_path / f"{d}.txt").write_text(" ".join(rng.choice(words, 20000, p=p)))
        corpora[d] = [tmp_path / f"{d}.txt"]
    c = NgramClassifier.from_corpora(corpora, sample_bytes=60000)
    assert isinstance(c, DomainClassifier) and c.domains == ["code", "docs", "prose"]
    for d, p in langs.items():
        got = [c.classify(" ".join(rng.choice(words, 40, p=p))) for _ in range(30)]
        assert got.count(d) >= 28, (d, got)
    assert c.classify("") == "general" and c.classify("zzz qqq") == "general"  # nothing known


def test_ngram_classifier_on_held_out_real_text_beats_keywords():
    """Python sources against this repository's Markdown docs (English sentences about
    code, which keywords send to prose or code): trained on some files, tested on 300-char
    pieces of files it never saw."""
    import sysconfig
    from pathlib import Path
    root, stdlib = Path(__file__).resolve().parent.parent, Path(sysconfig.get_paths()["stdlib"])
    held_docs = [root / "docs" / "algorithms.md", root / "README.md"]
    docs = sorted(p for p in (root / "docs").glob("*.md") if p not in held_docs)
    c = NgramClassifier.from_corpora({"code": sorted(stdlib.glob("[a-m]*.py")), "docs": docs}, sample_bytes=400000)

    def pieces(paths, limit=40):
        out = [t[i:i + 300] for t in (p.read_text(errors="replace") for p in paths) for i in range(0, len(t) - 300, 4000)]
        return out[:limit]

    tests = [("code", x) for x in pieces(sorted(stdlib.glob("[n-z]*.py")))] + [("docs", x) for x in pieces(held_docs)]
    right = {name: sum(cl.classify(x) == d for d, x in tests) for name, cl in (("ngram", c), ("keyword", KeywordClassifier()))}
    assert right["ngram"] >= 0.95 * len(tests) and right["ngram"] > right["keyword"], right


def test_ngram_features_and_sampling(tmp_path):
    f = features("a::b a")
    assert f["a"] == 2 and f["::"] == 1 and f["a ::"] == 1 and f[":: b"] == 1 and f["b a"] == 1
    path = tmp_path / "t.txt"
    path.write_text("x" * 5000 + "y" * 5000)
    s = sample_text(path, 1000, slices=4)
    assert "x" in s and "y" in s and len(s) < 1100  # evenly spaced pieces of the whole file
    assert sample_text(path, 10**6) == path.read_text()
    with pytest.raises(ValueError):
        NgramClassifier({})
    assert isinstance(make_classifier("ngram", {}), KeywordClassifier)       # no corpus: keywords
    assert isinstance(make_classifier("keyword", {"code": [path]}), KeywordClassifier)
    assert isinstance(make_classifier("ngram", {"code": [path]}), NgramClassifier)


# -- math ----------------------------------------------------------------------------------
@given(st.floats(0, 1), st.floats(0, 1))
def test_harmonic_mean_bounds(a, b):
    h = harmonic_mean(a, b)
    assert min(a, b) - 1e-12 <= h <= max(a, b) + 1e-12
    assert h == 0.0 if a == 0 or b == 0 else h == pytest.approx(2 * a * b / (a + b))


def test_update_is_ema_of_harmonic_mean():
    r = router(ema=0.5, classifier=Fixed("general"))
    r.start("a")
    s0 = r.scores("a")["coder"]
    assert s0 == pytest.approx(0.5)  # base score, no declared domain match
    r.update("a", "coder", confidence=0.8, accepted=2, proposed=4)
    s1 = 0.5 * s0 + 0.5 * harmonic_mean(0.8, 0.5)
    assert r.scores("a")["coder"] == pytest.approx(s1)
    r.update("a", "coder", confidence=0.9, accepted=0, proposed=3)  # nothing accepted: sample 0
    assert r.scores("a")["coder"] == pytest.approx(0.5 * s1)
    r.update("a", "coder", confidence=0.9, accepted=0, proposed=0)  # nothing proposed: accuracy 0
    assert r.scores("a")["coder"] == pytest.approx(0.25 * s1)


@settings(max_examples=50, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([d.name for d in DRAFTERS]), st.floats(0, 1),
                          st.integers(0, 8), st.integers(0, 8)), max_size=30))
def test_scores_stay_in_unit_interval(updates):
    r = router(classifier=Fixed("code"))
    r.start("a")
    for name, conf, acc, prop in updates:
        r.update("a", name, conf, min(acc, prop), prop)
        assert all(0.0 <= s <= 1.0 for s in r.scores("a").values())
        assert r.select("a", k=2)


# -- selection -----------------------------------------------------------------------------
def test_declared_domain_drafter_first_before_any_data():
    r = router(classifier=KeywordClassifier())
    assert r.start("a", "def f(x):\n    return x  # python") == "code"
    assert r.select("a", k=1) == ["coder"]
    assert r.start("b", "Der Hund ist nicht müde und die Katze schläft.") == "german"
    assert r.select("b", k=1) == ["deutsch"]


def test_exploits_best_drafter_after_evidence():
    r = router(classifier=Fixed("code"))
    r.start("a")
    for _ in range(6):
        r.update("a", "writer", 0.9, 4, 4)
        r.update("a", "coder", 0.3, 0, 4)
        r.record_round("a", 4)
    assert r.select("a", k=1) == ["writer"]
    assert r.select("a", k=2) == ["writer", "general"]  # coder fell below the untried base score
    assert r.scores("a")["coder"] < r.scores("a")["general"]


def test_respects_available_and_k():
    r = router(classifier=Fixed("code"))
    r.start("a")
    assert r.select("a", available={"writer", "deutsch"}, k=3) == ["writer", "deutsch"]
    assert r.select("a", available={"coder"}) == ["coder"]
    assert r.select("a", available=set()) == []
    assert r.select("a", available={"ghost"}) == []
    assert r.select("a", k=0) == []
    assert len(r.select("a")) == 2  # default k = max_drafters
    assert len(r.select("a", k=10)) == 4


@settings(max_examples=60, deadline=None)
@given(st.sets(st.sampled_from([d.name for d in DRAFTERS])), st.integers(0, 5), st.integers(0, 2**31),
       st.lists(st.integers(0, 5), max_size=12))
def test_select_properties(avail, k, seed, rounds):
    r = Router(DRAFTERS, explore_prob=0.5, seed=seed, classifier=Fixed("prose"))
    r.start("a")
    for acc in rounds:
        r.record_round("a", acc)
        picks = r.select("a", available=avail, k=k)
        assert len(picks) == min(k, len(avail))
        assert len(set(picks)) == len(picks)
        assert set(picks) <= avail


def test_explores_untried_drafter_when_accepted_length_drops():
    r = router(classifier=Fixed("code"), window=3, explore_threshold=1.5)
    r.start("a")
    assert r.select("a", k=1) == ["coder"]
    r.update("a", "coder", 0.9, 1, 1)  # coder stays the best-scored drafter ...
    for _ in range(2):
        r.record_round("a", 0)  # ... but the request's accepted length is 1
        assert r.select("a", k=1) == ["coder"]  # window not full yet: keep exploiting
    r.record_round("a", 0)
    assert r.select("a", k=1) == ["general"]  # best-ranked untried drafter
    assert r.explorations == 1
    # exploration restarted the window: no second exploration on the same evidence
    assert r.select("a", k=1) == ["coder"]
    assert r.explorations == 1


def test_explores_untried_first_then_random_when_all_tried():
    r = router(classifier=Fixed("code"), window=1)
    r.start("a")
    names = [d.name for d in DRAFTERS]
    r.update("a", "coder", 0.9, 1, 1)
    seen = []
    for _ in range(3):
        r.record_round("a", 0)
        picks = r.select("a", k=2)
        assert picks[0] == "coder"
        seen.append(picks[1])
        for p in picks:
            r.update("a", p, 0.9 if p == "coder" else 0.1, 1 if p == "coder" else 0, 1)
    # the runner-up ("general") is swapped for the best-ranked untried drafter each time
    assert seen[:2] == ["writer", "deutsch"]
    assert r.scores("a")["general"] == 0.5 and seen[2] in {"writer", "deutsch"}  # none untried left: random
    stream = []
    for _ in range(20):
        r.record_round("a", 0)
        picks = r.select("a", k=2)
        assert picks[0] == "coder" and picks[1] in names[:1] + names[2:]
        stream.append(picks[1])
    assert len(set(stream)) > 1  # random among the unpicked, seeded


def test_no_exploration_when_accepted_length_is_good():
    r = router(classifier=Fixed("code"), window=2)
    r.start("a")
    for _ in range(10):
        r.update("a", "coder", 0.9, 3, 4)
        r.record_round("a", 3)
        assert r.select("a", k=1) == ["coder"]
    assert r.explorations == 0
    assert r.accepted_length("a") == 4.0


def test_update_without_record_round_feeds_window():
    r = router(classifier=Fixed("code"), window=1)
    r.start("a")
    r.update("a", "coder", 0.5, 0, 4)
    r.update("a", "general", 0.5, 0, 4)
    assert r.select("a", k=1) != ["coder"]  # best drafter matched nothing: explore
    assert r.accepted_length("a") is None  # window restarted after exploring


def test_explore_prob_is_seeded():
    def picks(seed):
        r = Router(DRAFTERS, explore_prob=0.5, seed=seed, classifier=Fixed("code"))
        r.start("a")
        return [tuple(r.select("a", k=1)) for _ in range(40)]
    assert picks(1) == picks(1)
    assert len(set(picks(1))) > 1  # it does explore
    assert Router(DRAFTERS, explore_prob=0.0, classifier=Fixed("code")).explorations == 0


# -- priors across requests ------------------------------------------------------------------
def test_priors_learned_across_requests_change_initial_order():
    r = router(classifier=Fixed("code"))
    r.start("new0")
    assert r.select("new0", k=4)[0] == "coder"  # declared specialist first
    for i in range(3):  # evidence: for this domain the generalist is much better
        rid = f"r{i}"
        r.start(rid)
        for _ in range(5):
            r.update(rid, "general", 0.9, 4, 4)
            r.update(rid, "coder", 0.2, 0, 4)
        r.finish(rid)
    pri = r.priors["code"]
    assert pri["general"] > pri["coder"]
    assert set(pri) == {"general", "coder"}  # only tried drafters are folded in
    assert r.prior_counts["code"]["general"] == 3
    r.start("new1")
    assert r.select("new1", k=1) == ["general"]
    # another domain starts from each drafter's record over all domains: the generalist
    # that proved itself on code now leads in German too, before any German evidence
    r2 = Router(DRAFTERS, explore_prob=0.0, classifier=Fixed("german"))
    r2._prior_sums = r._prior_sums
    r2.start("g")
    assert r2.select("g", k=1) == ["general"]
    assert "german" not in r2.priors


def test_weight_free_specialist_does_not_carry_its_home_record_abroad():
    """A weight-free n-gram's high record on its own domain is its corpus's record: on
    another domain it starts from the base score, behind that domain's own n-gram. A
    model drafter's record still carries (it is a general language model)."""
    ds = [DrafterInfo("ngram-code", ("code",)), DrafterInfo("ngram-prose", ("prose",)),
          DrafterInfo("small", ("code",), model=True)]
    r = Router(ds, explore_prob=0.0, classifier=Fixed("code"))
    for i in range(4):  # on code both the code n-gram and the model do very well
        r.start(f"c{i}")
        for _ in range(5):
            r.update(f"c{i}", "ngram-code", 0.95, 4, 4)
            r.update(f"c{i}", "small", 0.95, 4, 4)
        r.finish(f"c{i}")
    r.classifier = Fixed("prose")
    r.start("p")
    s = r.scores("p")
    assert s["ngram-prose"] > s["ngram-code"] == pytest.approx(r.base_score)
    assert s["small"] > r.base_score + 0.1                   # the model's record carries over
    assert r.select("p", k=1) == ["small"] and r.select("p", k=2)[1] == "ngram-prose"


def test_prior_is_running_mean_shrunk_to_base():
    r = router(classifier=Fixed("prose"), ema=0.0, prior_weight=1.0)
    for i, acc in enumerate([4, 2]):
        r.start(f"r{i}")
        r.update(f"r{i}", "general", 1.0, acc, 4)
        r.finish(f"r{i}")
    finals = [1.0, harmonic_mean(1.0, 0.5)]
    assert r.priors["prose"]["general"] == pytest.approx(sum(finals) / 2)
    overall = (sum(finals) + 0.5) / 3  # all domains, shrunk to the base score
    assert r.initial_score("prose", DRAFTERS[0]) == pytest.approx((sum(finals) + overall) / 3)
    assert r.initial_score("code", DRAFTERS[0]) == pytest.approx(overall)  # no code data
    assert r.initial_score("prose", DRAFTERS[2]) == pytest.approx(0.75)  # declared, no data


# -- lifecycle and errors -------------------------------------------------------------------
def test_unknown_rid_errors_and_finish_forgets():
    r = router(classifier=Fixed("code"))
    with pytest.raises(KeyError, match="unknown request 'x'"):
        r.select("x")
    with pytest.raises(KeyError, match="unknown request"):
        r.update("x", "coder", 0.5, 1, 2)
    r.start("a")
    with pytest.raises(KeyError, match="unknown drafter"):
        r.update("a", "nobody", 0.5, 1, 2)
    assert r.domain("a") == "code"
    r.finish("a")
    r.finish("a")  # idempotent
    with pytest.raises(KeyError):
        r.scores("a")
    assert r.active == []


def test_from_config_and_validation():
    cfg = RoutingConfig(max_drafters_per_request=3, ema=0.25, explore_threshold=2.0, explore_prob=0.0)
    r = Router.from_config(DRAFTERS, cfg, classifier=Fixed("code"), seed=3)
    assert (r.max_drafters, r.ema, r.explore_threshold, r.explore_prob) == (3, 0.25, 2.0, 0.0)
    r.start("a")
    assert len(r.select("a")) == 3
    with pytest.raises(ValueError):
        Router([DrafterInfo("a"), DrafterInfo("a")])
    with pytest.raises(ValueError):
        Router(DRAFTERS, ema=1.0)
    assert math.isfinite(Router([]).initial_score("x", DrafterInfo("d")))
    r0 = Router([], classifier=Fixed("code"))
    r0.start("a")
    assert r0.select("a") == []


def test_tried_drafter_far_behind_the_best_is_dropped():
    """min_score_ratio: once tried, a drafter whose score is below that fraction of the best's
    leaves the request's rounds (it would only win fusion steps with confident misses);
    untried drafters are never cut, and a comparable one stays."""
    r = router(classifier=Fixed("code"), min_score_ratio=0.75)
    r.start("a")
    assert r.select("a", k=2) == ["coder", "general"]     # nothing tried: the priors decide
    for _ in range(6):
        r.update("a", "coder", 0.9, 4, 4)
        r.update("a", "general", 0.4, 1, 4)
        r.record_round("a", 4)
    assert r.scores("a")["general"] < 0.75 * r.scores("a")["coder"]
    assert r.select("a", k=2) == ["coder", "writer"]      # general cut; writer untried
    r.update("a", "writer", 0.85, 4, 4)                   # comparable to coder: both stay
    assert r.select("a", k=2) == ["coder", "writer"]
    r2 = router(classifier=Fixed("code"), min_score_ratio=0.0)
    r2.start("a")
    for _ in range(6):
        r2.update("a", "coder", 0.9, 4, 4)
        r2.update("a", "general", 0.4, 1, 4)
    assert len(r2.select("a", k=2)) == 2                  # ratio 0: always k drafters


def test_exploration_adds_a_drafter_when_the_cut_left_room():
    r = router(classifier=Fixed("code"), min_score_ratio=0.75, explore_prob=1.0)
    r.start("a")
    for name in ("general", "writer"):
        r.update("a", name, 0.1, 0, 4)
    for _ in range(6):
        r.update("a", "coder", 0.9, 4, 4)
    picks = r.select("a", k=2)
    assert picks[0] == "coder" and len(picks) == 2 and picks[1] != "coder"


def test_low_window_does_not_explore_a_drafter_the_priors_rule_out():
    """Hard text (accepted length below the threshold) triggers exploration only among
    drafters within min_score_ratio of the best: one that finished requests of this domain
    far behind is not tried again by every new request."""
    r = router(classifier=Fixed("code"), window=2, explore_threshold=1.5, min_score_ratio=0.75)
    for i in range(4):  # evidence: on code, "writer" is hopeless and "coder" good
        r.start(f"p{i}")
        for _ in range(4):
            r.update(f"p{i}", "coder", 0.9, 4, 4)
            r.update(f"p{i}", "writer", 0.1, 0, 4)
        r.finish(f"p{i}")
    r.start("a")
    avail = {"coder", "writer"}
    assert r.select("a", available=avail, k=1) == ["coder"]
    for _ in range(6):  # a hard stretch: accepted length 1 round after round
        r.record_round("a", 0)
        assert r.select("a", available=avail, k=1) == ["coder"]
    assert r.explorations == 0


def test_anchor_keeps_the_best_model_drafter_in_every_round():
    """anchor_model: the best available model drafter drafts every round whatever its score;
    the scores fill the other slot, and exploration on a hard stretch swaps only that one.
    Without the anchor, a weight-free drafter that kept its prior (it proposed nothing)
    and an explored one push the model out."""
    ds = [DrafterInfo("small", model=True), DrafterInfo("lookup"), DrafterInfo("ngram-a"), DrafterInfo("ngram-b"),
          DrafterInfo("big", model=True)]

    def run(anchor: bool) -> list[list[str]]:
        r = Router(ds, classifier=Fixed("german"), window=2, explore_threshold=1.5, anchor_model=anchor)
        r.start("a")
        picks = []
        for i in range(12):  # hard text: the model's score sinks, the lookup never proposes
            sel = r.select("a", available={"small", "lookup", "ngram-a", "ngram-b"}, k=2)
            picks.append(sel)
            for n in sel:
                if n != "lookup":
                    r.update("a", n, 0.3, 0 if n.startswith("ngram") else 1, 4)
            r.record_round("a", 0)
        return picks

    anchored = run(True)
    assert all(p[0] == "small" and len(p) == 2 for p in anchored), anchored
    assert {p[1] for p in anchored} >= {"lookup", "ngram-a"}          # the second slot still explores
    assert any("small" not in p for p in run(False))                  # the failure the anchor prevents
    r = Router(ds, classifier=Fixed("code"), anchor_model=True)
    r.start("b")
    assert r.select("b", available={"lookup", "ngram-a"}, k=2) == ["lookup", "ngram-a"]  # no model: plain ranking
    assert r.select("b", available={"big", "small", "lookup"}, k=1) == ["small"]        # k = 1: the anchor alone
    for _ in range(4):
        r.update("b", "big", 0.95, 4, 4)
    assert r.select("b", available={"big", "small", "lookup"}, k=2)[0] == "big"         # best-scoring model
    assert Router.from_config(ds, RoutingConfig()).anchor_model is True
    r.update("b", "lookup", 0.99, 4, 4)
    assert r.select("b", available={"small", "lookup"}, k=1) == ["small"]
    assert r.select("b", available={"small", "lookup"}, k=1, anchor=False) == ["lookup"]  # withheld under load
