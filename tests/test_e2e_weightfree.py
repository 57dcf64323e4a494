"""Weight-free drafters (domain n-gram tables, prompt lookup) served by real cosine-worker
processes through the same protocol, alone and fused with a neural drafter: every mode
stays token-identical to autoregressive."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cosine.client import Client
from cosine.control.cluster import LocalCluster
from cosine.workers.client import WorkerClient, WorkerError

from conftest import build_ngram_engine, write_cluster_config


@pytest.fixture(scope="module")
def weightfree_cluster(control_engines, tmp_path_factory):
    root = tmp_path_factory.mktemp("weightfree")
    vocab = json.loads((control_engines["target"] / "manifest.json").read_text())["vocab_size"]
    ngram = build_ngram_engine(root / "ngram-engine", vocab)
    cfg = write_cluster_config(root / "config.toml", control_engines["target"],
                               {"lookup": ("lookup", None), "ngram": ("ngram", ngram),
                                "poor": control_engines["poor"]},
                               sections={"routing": {"max_drafters_per_request": 3}})
    with LocalCluster(cfg) as cluster:
        yield cluster, cfg


PROMPTS = [[5, 6, 7, 8, 9, 5, 6, 7, 8, 9, 5, 6], [11, 12, 13, 11, 12, 13, 11, 12], [40, 3, 17, 22, 9, 31]]


def test_every_mode_with_weightfree_drafters_is_identical(weightfree_cluster) -> None:
    cluster, _ = weightfree_cluster
    with Client(cluster.endpoint, timeout_s=60) as c:
        for prompt in PROMPTS:
            ref = c.generate(prompt, max_tokens=24, mode="autoregressive").token_ids
            for mode in ("speculative", "specinfer", "cosine"):
                r = c.generate(prompt, max_tokens=24, mode=mode)
                assert r.token_ids == ref, (mode, prompt)
        used = c.generate(PROMPTS[0], max_tokens=24, mode="cosine").stats["drafters_used"]
        st = c.stats()
    assert set(used) & {"lookup", "ngram"}, used
    # guided drafting ran: the model drafter scored weight-free chains in one forward
    assert st["guided_steps"] > 0, st


def test_weightfree_worker_refuses_verify_and_serves_draft(weightfree_cluster) -> None:
    cluster, cfg_path = weightfree_cluster
    from cosine import config

    cfg = config.load(cfg_path)
    wc = WorkerClient(cfg.worker("lookup").endpoint, timeout_s=10)
    try:
        h, _ = wc.call("health", {})
        assert h["engine"]["architecture"] == "lookup"
        with pytest.raises(WorkerError) as e:
            wc.call("verify", {"requests": [{"rid": "x", "n": 1}]},
                    {"tokens": np.zeros(1, np.int32), "parents": np.full(1, -1, np.int32)})
        assert e.value.code == "unknown_op" and "weight-free" in e.value.message
        wc.call("prefill", {"requests": [{"rid": "w", "n": 6}]}, {"tokens": np.array([1, 2, 3, 1, 2, 3], np.int32)})
        h, a = wc.call("draft", {"requests": [{"rid": "w", "n_feed": 1, "k": 3, "topk": 2}]},
                       {"feed": np.array([1], np.int32)})
        # history 1 2 3 1 2 3 1: lookup continues the repeated span
        assert a["tokens"].tolist() == [2, 3, 1] and h["requests"][0]["length"] == 7 + 2
        h, a = wc.call("draft", {"requests": [{"rid": "w", "n_feed": 1, "k": 2, "keep": 3}]},
                       {"feed": np.array([9], np.int32)})
        assert a["tokens"].tolist() == [-1, -1] and float(a["token_probs"].max()) == 0.0
        assert h["requests"][0]["length"] == 4  # nothing proposed: only the fed token was kept
        wc.call("release", {"rids": ["w"]})
    finally:
        wc.close()


def test_guided_drafting_builds_the_same_trees(control_engines, tmp_path) -> None:
    """Guided drafting only changes how many forwards the model drafter runs: with fixed
    draft plans (adaptive off) every request takes the same rounds and accepts the same
    tokens with guide on and off, and only the guided cluster scored guide tokens."""
    vocab = json.loads((control_engines["target"] / "manifest.json").read_text())["vocab_size"]
    ngram = build_ngram_engine(tmp_path / "ngram-engine", vocab)
    runs = {}
    for guide in (True, False):
        cfg = write_cluster_config(tmp_path / f"guide-{guide}.toml", control_engines["target"],
                                   {"lookup": ("lookup", None), "ngram": ("ngram", ngram),
                                    "poor": control_engines["poor"]},
                                   sections={"routing": {"max_drafters_per_request": 3},
                                             "speculation": {"adaptive": False, "draft_len": 6},
                                             "fusion": {"guide": guide, "guide_min_reach": 0.05}})
        with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=60) as c:
            outs = [c.generate(p, max_tokens=24, mode="cosine") for p in PROMPTS * 2]
            runs[guide] = ([(o.token_ids, o.stats["rounds"], o.stats["mean_accepted_length"]) for o in outs],
                           c.stats()["guided_steps"])
    assert runs[True][0] == runs[False][0]
    assert runs[True][1] > 0 and runs[False][1] == 0, (runs[True][1], runs[False][1])


def test_round_without_proposals_is_rescued_by_a_model_drafter(control_engines, tmp_path) -> None:
    """One drafter per request, no anchor: when the router's pick is the prompt-lookup
    drafter and it finds no match, the round goes to the model drafter instead of verifying the root
    alone; outputs stay exact."""
    cfg = write_cluster_config(tmp_path / "config.toml", control_engines["target"],
                               {"lookup": ("lookup", None), "poor": control_engines["poor"]},
                               sections={"routing": {"max_drafters_per_request": 1, "anchor_model": False}})
    prompts = PROMPTS + [[40, 3, 17, 22, 9, 31, 40, 3, 17], [7, 7, 7, 7, 2, 9]]
    with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=60) as c:
        refs = [c.generate(p, max_tokens=24, mode="autoregressive").token_ids for p in prompts]
        outs = [c.generate(p, max_tokens=24, mode="cosine").token_ids for p in prompts * 2]
        st = c.stats()
    assert outs == refs * 2
    assert st["rescued_rounds"] > 0, st


def test_siblings_add_runner_up_candidates_and_stay_exact(control_engines, tmp_path) -> None:
    """[controller.fusion] siblings = 2: every drafter's runner-up per fused step joins the
    tree (routed solo chains expand the same way), so about twice as many candidates get
    verified and labelled for calibration; greedy outputs stay token-identical."""
    trials = {}
    for sib in (1, 2):
        cfg = write_cluster_config(tmp_path / f"sib-{sib}.toml", control_engines["target"],
                                   {"lookup": ("lookup", None), "poor": control_engines["poor"]},
                                   sections={"speculation": {"adaptive": False, "draft_len": 4},
                                             "fusion": {"siblings": sib}})
        with LocalCluster(cfg) as cluster, Client(cluster.endpoint, timeout_s=60) as c:
            refs = [c.generate(p, max_tokens=20, mode="autoregressive").token_ids for p in PROMPTS]
            outs = [c.generate(p, max_tokens=20, mode="cosine").token_ids for p in PROMPTS]
            st = c.stats()
        assert outs == refs, sib
        trials[sib] = sum(t for dom in st["calibration"].values() for bins in dom.values() for _, t in bins)
    assert trials[2] > 1.4 * trials[1] > 0, trials
