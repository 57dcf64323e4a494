"""TokenTree and the tree helpers: construction, prefix-trie merge, reorder, truncate."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cosine.tree import TokenTree, TreeError, ancestor_mask, depths, merge_trees, path_to, position_ids


@st.composite
def token_trees(draw, max_nodes: int = 16, vocab: int = 3, root: int | None = None,
                max_prob: float = 1.0) -> TokenTree:
    """Random valid trees; a small vocabulary makes equal siblings and shared prefixes common."""
    n = draw(st.integers(1, max_nodes))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    tokens = draw(st.lists(st.integers(0, vocab - 1), min_size=n, max_size=n))
    if root is not None:
        tokens[0] = root
    proposers = [-1] + draw(st.lists(st.integers(0, 3), min_size=n - 1, max_size=n - 1))
    probs = [1.0] + draw(st.lists(st.sampled_from([0.05, 0.1, 0.25, 0.5, 0.75, max_prob]),
                                  min_size=n - 1, max_size=n - 1))
    return TokenTree(np.array(tokens), np.array(parents), np.array(proposers), np.array(probs))


def all_paths(t: TokenTree) -> list[tuple[int, ...]]:
    """Token tuple (after the root) of every node, in node order."""
    return [tuple(t.path_tokens(i).tolist()) for i in range(t.n)]


def path_records(t: TokenTree) -> list[tuple]:
    """Per node: its path as (token, proposer, prob) triples - identity up to node order."""
    return sorted(tuple((int(t.tokens[j]), int(t.proposers[j]), float(t.probs[j])) for j in t.path(i))
                  for i in range(t.n))


# ----- construction and validation ---------------------------------------------------------

def test_validation_errors():
    with pytest.raises(TreeError):
        TokenTree(np.array([1, 2]), np.array([-1, 1]))           # self-parent
    with pytest.raises(TreeError):
        TokenTree(np.array([1, 2, 3]), np.array([-1, 0]))        # length mismatch
    with pytest.raises(TreeError):
        TokenTree(np.array([1, -2]), np.array([-1, 0]))          # negative token
    with pytest.raises(TreeError):
        TokenTree(np.array([1, 2]), np.array([-1, 0]), probs=np.array([1.0, np.nan]))
    assert issubclass(TreeError, ValueError)


def test_dtypes_are_canonical_and_arrays_read_only():
    t = TokenTree(np.array([4, 5], np.int32), np.array([-1, 0], np.int32),
                  np.array([-1, 2], np.int64), np.array([1.0, 0.5]))
    assert (t.tokens.dtype, t.parents.dtype, t.proposers.dtype, t.probs.dtype) == \
        (np.int64, np.int64, np.int32, np.float32)
    with pytest.raises(ValueError):
        t.tokens[0] = 9
    d = TokenTree(np.array([4, 5]), np.array([-1, 0]))          # defaults: root -1, probs 1
    assert d.proposers.tolist() == [-1, 0] and d.probs.tolist() == [1.0, 1.0]


def test_root_and_chain():
    r = TokenTree.root(7)
    assert r.n == 1 and r.tokens.tolist() == [7] and r.proposers.tolist() == [-1] and r.probs.tolist() == [1.0]
    c = TokenTree.from_chain(7, [1, 2, 3], proposer=2, probs=[0.5, 0.25, 1.0])
    assert c.parents.tolist() == [-1, 0, 1, 2]
    assert c.proposers.tolist() == [-1, 2, 2, 2]
    assert c.path(3) == [0, 1, 2, 3] and c.path_tokens(3).tolist() == [1, 2, 3]
    assert c.path_tokens(0).size == 0
    assert c.depths().tolist() == [0, 1, 2, 3]
    assert c.position_ids(10).tolist() == [10, 11, 12, 13]
    assert TokenTree.from_chain(7, []).n == 1


def test_add_prefix_trie_semantics():
    t, a = TokenTree.root(0).add(0, 5, proposer=1, prob=0.3)
    t2, b = t.add(0, 5, proposer=0, prob=0.2)      # less confident: node unchanged
    assert b == a and t2 == t
    t3, c = t.add(0, 5, proposer=2, prob=0.9)      # more confident: takes over the node
    assert c == a and t3.n == 2 and t3.proposers[a] == 2 and np.isclose(t3.probs[a], 0.9)
    t4, d = t.add(0, 5, proposer=0, prob=0.3)      # tie: lower drafter index
    assert d == a and t4.proposers[a] == 0
    t5, e = t.add(0, 5, proposer=0, prob=0.2, merge=False)
    assert e == 2 and t5.n == 3 and t5.children(0) == [1, 2]
    assert t.n == 2  # trees are immutable
    with pytest.raises(TreeError):
        t.add(5, 1, 0, 0.5)


def test_from_expansion_example():
    ids = np.array([[4, 6, -1], [5, 5, 8]])
    pr = np.array([[0.6, 0.3, 0.0], [0.5, 0.5, 0.2]])
    t = TokenTree.from_expansion(9, [4, 5], ids, pr, proposer=3)
    # root; chain 4 (+ sibling 6); chain 5 under 4 (+ sibling 8, duplicate 5 merged)
    assert t.tokens.tolist() == [9, 4, 6, 5, 8]
    assert t.parents.tolist() == [-1, 0, 0, 1, 1]
    assert t.proposers.tolist() == [-1, 3, 3, 3, 3]
    assert np.allclose(t.probs, [1.0, 0.6, 0.3, 0.5, 0.2])
    with pytest.raises(TreeError):
        TokenTree.from_expansion(9, [7], np.array([[4, 6]]), np.array([[0.5, 0.5]]))  # 7 not in row
    t2 = TokenTree.from_expansion(9, [7], np.array([[4, 6]]), np.array([[0.5, 0.4]]), chain_probs=[0.1])
    assert t2.tokens.tolist() == [9, 7, 4, 6] and np.isclose(t2.probs[1], 0.1)


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_from_expansion_shape(data):
    k = data.draw(st.integers(0, 5))
    w = data.draw(st.integers(1, 4))
    ids = np.array(data.draw(st.lists(st.lists(st.integers(-1, 5), min_size=w, max_size=w),
                                      min_size=k, max_size=k)), dtype=np.int64).reshape(k, w)
    chain = [data.draw(st.integers(0, 5)) for _ in range(k)]
    probs = np.full((k, w), 0.1)
    t = TokenTree.from_expansion(0, chain, ids, probs, chain_probs=[0.5] * k)
    extra = [len({x for x in ids[j].tolist() if x >= 0} - {chain[j]}) for j in range(k)]
    assert t.n == 1 + k + sum(extra)
    # walk the chain: at each step exactly one child of the chain node carries the chain token
    node, on_chain = 0, [0]
    for j, tok in enumerate(chain):
        kids = [c for c in t.children(node) if t.tokens[c] == tok]
        assert len(kids) == 1 and np.isclose(t.probs[kids[0]], 0.5)
        node = kids[0]
        on_chain.append(node)
        sibs = {int(t.tokens[c]) for c in t.children(on_chain[-2]) if c != node}
        assert sibs == {x for x in ids[j].tolist() if x >= 0} - {tok}
    for i in set(range(t.n)) - set(on_chain):   # everything else is a leaf off the chain
        assert not t.children(i) and t.parents[i] in on_chain and np.isclose(t.probs[i], 0.1)
    assert t.proposers.tolist() == [-1] + [0] * (t.n - 1)


# ----- merge -------------------------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(trees=st.lists(token_trees(root=7), min_size=1, max_size=4))
def test_merge_is_prefix_trie_union(trees):
    m = merge_trees(trees)
    paths = all_paths(m)
    union = {p for t in trees for p in all_paths(t)}
    assert set(paths) == union                      # every input path, nothing else
    assert m.n == len(union) == len(set(paths))     # one node per distinct prefix
    for u in range(m.n):                            # a trie: no equal siblings
        toks = [int(m.tokens[c]) for c in m.children(u)]
        assert len(toks) == len(set(toks))
    # each merged node carries the most confident (proposer, prob) among the inputs' equal nodes
    best: dict[tuple, tuple] = {}
    for t in trees:
        for i, p in enumerate(all_paths(t)):
            if i:
                cand = (float(t.probs[i]), -int(t.proposers[i]))
                best[p] = max(best.get(p, cand), cand)
    for i, p in enumerate(paths):
        if i:
            assert (float(m.probs[i]), -int(m.proposers[i])) == best[p]


def test_merge_rejects_different_roots():
    with pytest.raises(TreeError):
        merge_trees([TokenTree.root(1), TokenTree.root(2)])
    with pytest.raises(TreeError):
        merge_trees([])


# ----- order, masks, positions ---------------------------------------------------------------

@settings(max_examples=100, deadline=None)
@given(t=token_trees())
def test_dfs_order_and_reorder(t):
    order = t.dfs_order()
    assert sorted(order.tolist()) == list(range(t.n)) and order[0] == 0
    # pre-order: every subtree is a contiguous block starting at its root
    size = np.ones(t.n, dtype=int)
    for i in range(t.n - 1, 0, -1):
        size[t.parents[i]] += size[i]
    pos = {int(u): k for k, u in enumerate(order)}
    for u in range(t.n):
        block = set(order[pos[u]:pos[u] + size[u]].tolist())
        assert all(u in t.path(v) for v in block)
    r = t.reorder(order)
    assert path_records(r) == path_records(t)
    assert np.array_equal(r.attention_mask(), t.attention_mask()[np.ix_(order, order)])
    assert np.array_equal(r.position_ids(5), t.position_ids(5)[order])
    assert np.array_equal(t.attention_mask(), ancestor_mask(t.parents))
    assert np.array_equal(t.position_ids(3), position_ids(t.parents, 3))
    assert np.array_equal(t.depths(), depths(t.parents))
    assert all(t.path(i) == path_to(t.parents, i) for i in range(t.n))
    assert t.reorder(np.arange(t.n)) == t


def test_reorder_rejects_non_topological():
    t = TokenTree.from_chain(0, [1, 2])
    with pytest.raises(TreeError):
        t.reorder([0, 2, 1])
    with pytest.raises(TreeError):
        t.reorder([0, 1])


# ----- truncate ----------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(t=token_trees(max_nodes=20), k=st.integers(1, 24))
def test_truncate_keeps_best_paths(t, k):
    tt = t.truncate(k)
    assert tt.n == min(k, t.n)
    TokenTree(tt.tokens, tt.parents, tt.proposers, tt.probs)  # valid
    records = set(path_records(t))
    assert set(path_records(tt)) <= records
    # with probs <= 1 the kept set is a global top-k by path probability
    kept, full = np.sort(tt.path_probs())[::-1], np.sort(t.path_probs())[::-1]
    assert np.allclose(kept, full[:tt.n])


@settings(max_examples=60, deadline=None)
@given(t=token_trees(max_nodes=12, max_prob=3.0), k=st.integers(1, 12))
def test_truncate_stays_valid_with_odd_probs(t, k):
    tt = t.truncate(k)  # probs > 1 break monotonicity; the result must still be a tree
    assert tt.n == min(k, t.n)
    assert set(path_records(tt)) <= set(path_records(t))


def test_truncate_example_and_errors():
    # root -> a(0.9) -> b(0.9) ; root -> c(0.5) -> d(0.99)
    t = TokenTree(np.array([0, 1, 2, 3, 4]), np.array([-1, 0, 1, 0, 3]),
                  np.array([-1, 0, 0, 1, 1]), np.array([1, 0.9, 0.9, 0.5, 0.99]))
    assert t.truncate(3).tokens.tolist() == [0, 1, 2]
    assert t.truncate(4).tokens.tolist() == [0, 1, 2, 3]
    assert t.truncate(99) is t
    with pytest.raises(TreeError):
        t.truncate(0)
    with pytest.raises(TreeError):
        t.subtree([0, 2])


# ----- prune -------------------------------------------------------------------------------

@settings(max_examples=150, deadline=None)
@given(t=token_trees(max_nodes=20), g=st.sampled_from([0.0, 0.01, 0.1, 0.3, 0.6, 1.0]))
def test_prune_keeps_exactly_the_nodes_worth_their_gain(t, g):
    conf = np.asarray(t.probs, np.float64).copy()
    tt, kept = t.prune(conf, g)
    TokenTree(tt.tokens, tt.parents, tt.proposers, tt.probs)  # a valid tree
    gain = t.path_probs(np.clip(conf, 0, 1))
    assert kept[0] == 0 and list(kept) == sorted(kept)
    assert set(kept.tolist()) == {0} | {i for i in range(t.n) if gain[i] >= g}
    assert set(path_records(tt)) <= set(path_records(t))
    assert [tuple(tt.path_tokens(i).tolist()) for i in range(tt.n)] == [all_paths(t)[k] for k in kept]
    if g == 0.0:
        assert tt is t


@settings(max_examples=150, deadline=None)
@given(t=token_trees(max_nodes=20), g=st.sampled_from([0.05, 0.2, 0.5]), seed=st.integers(0, 2 ** 16))
def test_prune_is_lossless_under_greedy_verification(t, g, seed):
    """Whatever is pruned, greedy verification of the pruned tree commits a prefix of what
    the full tree commits: pruning only costs accepted tokens, never changes them."""
    from cosine.control.verify import verify_greedy

    t = merge_trees([t])  # greedy trees: equal siblings share a node
    am = np.random.default_rng(seed).integers(0, 3, t.n)
    tt, kept = t.prune(t.probs, g)
    full, part = verify_greedy(t, am).tokens.tolist(), verify_greedy(tt, am[kept]).tokens.tolist()
    assert full[:len(part)] == part and len(part) >= 1


def test_prune_example_and_errors():
    # root -> a(0.9) -> b(0.5) ; root -> c(0.2)
    t = TokenTree(np.array([0, 1, 2, 3]), np.array([-1, 0, 1, 0]), np.array([-1, 0, 0, 1]),
                  np.array([1, 0.9, 0.5, 0.2]))
    tt, kept = t.prune([1, 0.9, 0.5, 0.2], 0.3)   # gains 0.9, 0.45, 0.2
    assert kept.tolist() == [0, 1, 2] and tt.tokens.tolist() == [0, 1, 2]
    tt, kept = t.prune([1, 0.9, 0.5, 0.2], 0.5)
    assert kept.tolist() == [0, 1] and tt.parents.tolist() == [-1, 0]
    assert t.prune([1, 0.1, 0.1, 0.1], 1.0)[1].tolist() == [0]  # the root always stays
    with pytest.raises(TreeError):
        t.prune([1, 0.5], 0.1)
