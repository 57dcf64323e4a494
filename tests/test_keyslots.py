"""Key slots (cosine/keyslots.py): the placement's invariants as properties, and the
claim they exist for: a quantized engine's tree verify gives, bit for bit, the logits of
decoding the same tokens one at a time, through the worker's real ops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cosine.config import LimitsConfig, ModelConfig, WorkerConfig
from cosine.keyslots import KeyLayout, appended, place
from cosine.tree import depths, path_to
from cosine.workers.engine import Engine
from cosine.workers.kvcache import KVCache
from cosine.workers.neural import NeuralOps
from cosine.workers.stats import Stats


@st.composite
def trees(draw: st.DrawFn, max_nodes: int = 24) -> np.ndarray:
    n = draw(st.integers(1, max_nodes))
    return np.array([-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)], np.int64)


LAYOUTS = st.sampled_from([KeyLayout(8, 128), KeyLayout(16, 128), KeyLayout(4, 32)])


@settings(max_examples=300, deadline=None)
@given(trees(), st.integers(0, 600), LAYOUTS)
def test_exact_nodes_sit_in_decodings_lane_and_block_in_path_order(parents, base, layout) -> None:
    placed = place(parents, base, layout)
    q = base + depths(parents)
    s, ex = placed.slots, placed.exact
    assert len(set(s.tolist())) == parents.size and (s >= base).all()
    assert ex[0]  # the root always has its own position
    assert ((s[ex] - q[ex]) % layout.lanes == 0).all()
    assert (s[ex] // layout.block == q[ex] // layout.block).all()
    for i in range(1, parents.size):
        if ex[i]:
            assert ex[parents[i]] and s[i] > s[parents[i]]  # exact paths, keys in decoding's order
    assert (s[ex] < layout.keys_needed(int(q.max()))).all()


@settings(max_examples=200, deadline=None)
@given(trees(), st.integers(0, 600), LAYOUTS)
def test_a_tree_pruned_to_its_exact_nodes_is_exact(parents, base, layout) -> None:
    """What the control plane relies on: it drops the inexact nodes and sends the rest."""
    keep = np.flatnonzero(place(parents, base, layout).exact)
    new = {int(o): i for i, o in enumerate(keep)}
    pruned = np.array([-1] + [new[int(parents[o])] for o in keep[1:]], np.int64)
    assert place(pruned, base, layout).exact.all()


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 40), st.integers(0, 600), LAYOUTS)
def test_a_chain_is_laid_out_at_its_positions(n, base, layout) -> None:
    placed = place(np.arange(n) - 1, base, layout)
    assert placed.exact.all() and (placed.slots == base + np.arange(n)).all()


def test_siblings_take_the_next_column_of_their_lane_and_give_up_at_the_block_end() -> None:
    # root, three children, one grandchild under the last child; lanes 8, blocks of 32
    parents = np.array([-1, 0, 0, 0, 3])
    placed = place(parents, 20, KeyLayout(8, 32), limit=40)
    assert placed.slots[:3].tolist() == [20, 21, 29]
    assert placed.exact.tolist() == [True, True, True, False, False]  # 37 is past the block end (32)
    assert len(set(placed.slots.tolist())) == 5 and placed.slots.max() < 40


def test_appended_slots_reproduce_the_old_layout() -> None:
    assert appended((2, 1, 3, 10)).tolist() == [[7, 8, 9]] * 2


# ----- the claim, through the worker's ops -----------------------------------------------

PROMPT_LEN = (9, 118)  # the second puts the tree across a block end (128)
TREE = [-1, 0, 0, 0, 1, 1, 2, 4, 4, 7, 9]


@pytest.fixture(scope="module")
def int4_engine(tiny_models: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    from cosine.export.build import export_engine

    out = tmp_path_factory.mktemp("keyslots") / "int4"
    export_engine(tiny_models["qwen2"], out, quantize="int4", progress=False)
    return out


def _ops(engine_dir: Path) -> NeuralOps:
    e = Engine(engine_dir, threads=1, min_rows=2)
    cache = KVCache(e.num_layers, e.num_kv_heads, e.head_dim, e.dtype, budget_tokens=1 << 14,
                    max_tokens=e.max_positions, chunk_tokens=64, arrays=e.arrays)
    return NeuralOps(e, cache, WorkerConfig("w", "m"), ModelConfig("m", "target", engine="x"),
                     LimitsConfig(), Stats())


def _tree_logits(ops: NeuralOps, prompt: np.ndarray, tokens: np.ndarray) -> np.ndarray:
    ops.handle({"op": "prefill", "requests": [{"rid": "t", "n": prompt.size}]}, {"tokens": prompt})
    _, a = ops.handle({"op": "verify", "return": "logits", "requests": [{"rid": "t", "n": len(TREE)}]},
                      {"tokens": tokens, "parents": np.array(TREE, np.int32)})
    ops.handle({"op": "release", "rids": ["t"]}, {})
    return np.asarray(a["logits"])


def _decoded_logits(ops: NeuralOps, prompt: np.ndarray, path: list[int]) -> list[np.ndarray]:
    """Autoregressive decoding as serve runs it: a one-node verify per token, committing
    the previous one inline."""
    ops.handle({"op": "prefill", "requests": [{"rid": "d", "n": prompt.size}]}, {"tokens": prompt})
    out = []
    for i, tok in enumerate(path):
        req = {"rid": "d", "n": 1, **({"commit": [0]} if i else {})}
        _, a = ops.handle({"op": "verify", "return": "logits", "requests": [req]},
                          {"tokens": np.array([tok], np.int32), "parents": np.array([-1], np.int32)})
        out.append(np.asarray(a["logits"])[0])
    ops.handle({"op": "release", "rids": ["d"]}, {})
    return out


@pytest.mark.parametrize("prompt_len", PROMPT_LEN)
def test_a_quantized_tree_verify_is_bit_identical_to_decoding(int4_engine: Path, prompt_len: int) -> None:
    """Every exactly placed node's logits equal decoding's bit for bit. The same engine
    with new keys appended after the past (the layout before key slots) differs: the
    test can fail."""
    rng = np.random.default_rng(prompt_len)
    ops = _ops(int4_engine)
    assert ops.engine.layout is not None
    V = ops.engine.vocab_size
    prompt = rng.integers(0, V, prompt_len).astype(np.int32)
    tokens = rng.integers(0, V, len(TREE)).astype(np.int32)
    exact = place(np.array(TREE), prompt_len, ops.engine.layout).exact
    tree = _tree_logits(ops, prompt, tokens)
    assert ops.engine.inexact_nodes == int((~exact).sum())
    if prompt_len > 100:
        assert not exact.all()  # the block end is crossed: some siblings cannot be exact
    decoded = {}
    for node in np.flatnonzero(exact):
        path = path_to(np.array(TREE), int(node))
        decoded[int(node)] = _decoded_logits(ops, prompt, [int(tokens[u]) for u in path])[-1]
        assert np.array_equal(tree[node], decoded[int(node)]), f"node {node} differs from decoding"

    # and decoding itself equals one forward of the whole sequence (no past)
    seq = np.concatenate([prompt, tokens[:1]]).astype(np.int64)[None]
    one = ops.engine.forward(seq, np.arange(seq.shape[1])[None], np.tril(np.ones((seq.shape[1],) * 2, bool))[None, None],
                             ops.engine.empty_past(), np.array([[seq.shape[1] - 1] * 2]))[0][0, 0]  # 2 rows, as min_rows
    assert np.array_equal(one, decoded[0])

    ops.engine.layout = None  # the old layout, on the same engine
    old = _tree_logits(ops, prompt, tokens)
    assert any(not np.array_equal(old[u], d) for u, d in decoded.items())
