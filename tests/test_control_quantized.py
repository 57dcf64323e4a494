"""A quantized target (int4 blocks, int8 activations) is lossless end to end: every mode
gives token for token its own autoregressive output, across a 128-key block end and in
batches, with no tree node laid out unlike decoding (cosine/keyslots.py). Real worker
processes and sockets, tiny models. The tiny target's argmax margins are too wide for a
last-bit difference to flip them, so identity alone would hold with any layout: what
fails here without key slots is the verifier's count of inexact nodes; the bit-exactness
itself is checked, and fails on the old layout, in tests/test_keyslots.py."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from cosine.client import AsyncClient, Client
from cosine.control.drafting.trees import Draft
from cosine.control.verification import prune_inexact
from cosine.keyslots import KeyLayout, place
from cosine.tree import TokenTree
from cosine.workers.client import WorkerClient

from conftest import write_cluster_config

MODES = ("speculative", "specinfer", "cosine")
# 100-118 prompt tokens and 40 new ones: every request crosses position 128
PROMPTS = [list(np.random.default_rng(i).integers(3, 60, n)) for i, n in enumerate((100, 111, 118, 104))]


def test_a_greedy_draft_is_pruned_to_its_exact_nodes() -> None:
    """The control plane's half: near a block end, siblings without an exact key column
    go (with their subtrees) before the tree is sent; the kept tree is all exact."""
    layout = KeyLayout(8, 128)
    tree = TokenTree.root(1)
    for parent, tok in ((0, 2), (0, 3), (0, 4), (1, 5), (1, 6), (3, 7)):
        tree, _ = tree.add(parent, tok, proposer=0, prob=0.5, merge=False)
    d = Draft(tree)
    assert prune_inexact(SimpleNamespace(committed=[0] * 10), d, layout) == 0  # far from a block end
    r = SimpleNamespace(committed=[0] * 120)  # the root at position 119: column 127 is its block's last
    dropped = prune_inexact(r, d, layout)
    assert dropped > 0 and d.tree.n == tree.n - dropped
    assert place(d.tree.parents, 119, layout).exact.all()
    assert d.tree.tokens[:2].tolist() == [1, 2]  # the root and its first child stay


@pytest.fixture(scope="module")
def quantized_cluster(control_engines: dict[str, Path], tmp_path_factory: pytest.TempPathFactory):
    from cosine.control.cluster import LocalCluster
    from cosine.export.build import export_engine
    from cosine.export.tiny import make_tiny_model

    root = tmp_path_factory.mktemp("quantized")
    model = make_tiny_model(root / "hf", arch="llama", seed=0)
    export_engine(model, root / "int4", quantize="int4", progress=False)
    cfg = write_cluster_config(root / "config.toml", root / "int4",
                               {"good": root / "int4", "poor": control_engines["poor"]},
                               sections={"scheduling": {"max_batch": 16}}, limits={"max_prompt_tokens": 200})
    with LocalCluster(cfg) as c:
        yield c


def _verifier_stats(cluster) -> dict:
    with WorkerClient(cluster.cfg.worker("verifier-0").endpoint, timeout_s=10) as w:
        return w.call("stats", {})[0]


def test_every_mode_matches_autoregressive_with_a_quantized_target(quantized_cluster) -> None:
    with Client(quantized_cluster.endpoint, timeout_s=120) as c:
        ref = [c.generate(p, max_tokens=40, mode="autoregressive").token_ids for p in PROMPTS]
        for mode in MODES:
            for p, want in zip(PROMPTS, ref):
                r = c.generate(p, max_tokens=40, mode=mode)
                assert r.token_ids == want, mode
        stats = c.stats()
    assert _verifier_stats(quantized_cluster)["inexact_nodes"] == 0
    # the block end was crossed with wide trees: serve dropped nodes the verifier could not
    # place exactly (without that pruning, the verifier's inexact_nodes above would count them)
    assert stats["inexact_pruned"] > 0


def test_batched_requests_match_autoregressive_with_a_quantized_target(quantized_cluster) -> None:
    """Concurrent requests share forwards with ragged pasts: still each one's own decoding."""
    async def run() -> list[list[int]]:
        async with AsyncClient(quantized_cluster.endpoint, timeout_s=120) as c:
            outs = await asyncio.gather(*(c.generate(p, max_tokens=40, mode=m) for m in MODES for p in PROMPTS))
        return [o.token_ids for o in outs]

    with Client(quantized_cluster.endpoint, timeout_s=120) as c:
        ref = [c.generate(p, max_tokens=40, mode="autoregressive").token_ids for p in PROMPTS]
    got = asyncio.run(run())
    assert got == ref * len(MODES)
    assert _verifier_stats(quantized_cluster)["inexact_nodes"] == 0
