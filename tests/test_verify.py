"""Tree verification: greedy properties (hypothesis) and the exactness of stochastic
verification (chi-square against the target, with planted bugs proving the test's power)."""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import cosine.control.verify as V
from cosine.control.verify import VerifyResult, target_distribution, verify_greedy, verify_stochastic
from cosine.tree import TokenTree

from test_tree import token_trees


# ----- greedy ------------------------------------------------------------------------------

def check_greedy_result(tree: TokenTree, am: np.ndarray, res: VerifyResult) -> None:
    nodes = res.nodes
    assert nodes[0] == 0 and res.n_accepted == len(nodes) - 1
    for a, b in zip(nodes, nodes[1:]):
        assert tree.parents[b] == a                 # a path from the root
        assert tree.tokens[b] == am[a]              # each accepted token is the parent's argmax
    last = nodes[-1]
    assert all(tree.tokens[c] != am[last] for c in tree.children(last))   # maximal
    assert res.tokens.dtype == np.int64
    assert res.tokens.tolist() == tree.tokens[nodes[1:]].tolist() + [int(am[last])]
    assert sum(res.accepted_by.values()) == res.n_accepted
    for d, k in res.accepted_by.items():
        assert k == sum(int(tree.proposers[u]) == d for u in nodes[1:])


@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_greedy_path_properties(data):
    tree = data.draw(token_trees(max_nodes=20, vocab=3))
    am = np.array(data.draw(st.lists(st.integers(0, 2), min_size=tree.n, max_size=tree.n)))
    check_greedy_result(tree, am, verify_greedy(tree, am))


def greedy_target(seq: tuple[int, ...], vocab: int = 3) -> int:
    """A deterministic 'target model': argmax as a hash of the whole context."""
    return int(np.random.default_rng([7, len(seq), *seq]).integers(vocab))


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), prompt=st.lists(st.integers(0, 2), min_size=1, max_size=3))
def test_greedy_rounds_reproduce_greedy_decoding(seed, prompt):
    rng = np.random.default_rng(seed)
    length = len(prompt) + 12
    expected = list(prompt)
    while len(expected) < length:
        expected.append(greedy_target(tuple(expected)))
    committed = list(prompt)
    while len(committed) < length:
        # a random tree rooted at the last committed token; small vocab -> frequent hits
        n = int(rng.integers(1, 12))
        parents = [-1] + [int(rng.integers(0, i)) for i in range(1, n)]
        tokens = [committed[-1]] + rng.integers(0, 3, n - 1).tolist()
        tree = TokenTree(np.array(tokens), np.array(parents))
        am = np.array([greedy_target(tuple(committed) + tuple(tree.path_tokens(u).tolist()))
                       for u in range(tree.n)])
        res = verify_greedy(tree, am)
        check_greedy_result(tree, am, res)
        committed += res.tokens.tolist()
    assert committed[:length] == expected


def test_greedy_root_only_and_errors():
    res = verify_greedy(TokenTree.root(3), np.array([8]))
    assert res.nodes == [0] and res.tokens.tolist() == [8] and res.n_accepted == 0 and res.accepted_by == {}
    with pytest.raises(ValueError):
        verify_greedy(TokenTree.root(3), np.array([1, 2]))


def test_greedy_equal_siblings_take_lowest_index():
    t = TokenTree(np.array([0, 5, 5]), np.array([-1, 0, 0]), np.array([-1, 1, 2]), np.array([1, .5, .5]))
    res = verify_greedy(t, np.array([5, 6, 7]))
    assert res.nodes == [0, 1] and res.tokens.tolist() == [5, 6] and res.accepted_by == {1: 1}


# ----- target distribution -----------------------------------------------------------------

def test_target_distribution():
    logits = np.array([[2.0, 1.0, 0.0, -1.0], [1e4, 1e4 - 1, -1e4, 0.0]])
    p = target_distribution(logits, 1.0)
    assert p.dtype == np.float64 and p.shape == logits.shape and np.allclose(p.sum(-1), 1)
    e = np.exp(logits[0] - logits[0].max())
    assert np.allclose(p[0], e / e.sum())
    assert np.all(np.isfinite(p[1])) and np.isclose(p[1, 0] / p[1, 1], np.e)   # stable for huge logits
    cold = target_distribution(logits[0], 0.5)
    assert np.allclose(cold, np.exp(2 * logits[0]) / np.exp(2 * logits[0]).sum())
    with pytest.raises(ValueError):
        target_distribution(logits, 0.0)
    with pytest.raises(ValueError):
        target_distribution(logits, 1.0, top_p=0.0)
    with pytest.raises(ValueError):
        target_distribution(np.full(3, -np.inf), 1.0)


def test_top_p_nucleus():
    base = np.log(np.array([0.15, 0.5, 0.05, 0.3]))
    p = target_distribution(base, 1.0, top_p=0.8)       # 0.5 + 0.3 reaches 0.8
    assert np.allclose(p, [0, 0.5 / 0.8, 0, 0.3 / 0.8])
    p = target_distribution(base, 1.0, top_p=0.81)      # needs the 0.15 too
    assert np.allclose(p, np.array([0.15, 0.5, 0, 0.3]) / 0.95)
    p = target_distribution(base, 1.0, top_p=0.01)      # always keeps the top token
    assert np.allclose(p, [0, 1, 0, 0])
    p = target_distribution(np.zeros((2, 4)), 1.0, top_p=0.5)  # ties: lower ids first
    assert np.allclose(p, [[0.5, 0.5, 0, 0]] * 2)


# ----- stochastic: harness -----------------------------------------------------------------

def chi2_sf(x: float, dof: int) -> float:
    """P[chi2_dof > x] = regularized upper incomplete gamma Q(dof/2, x/2) (no scipy here)."""
    a, x = dof / 2.0, x / 2.0
    if x <= 0:
        return 1.0
    front = math.exp(-x + a * math.log(x) - math.lgamma(a))
    if x < a + 1:  # series for the lower function P
        term = total = 1.0 / a
        ap = a
        for _ in range(10_000):
            ap += 1
            term *= x / ap
            total += term
            if abs(term) < abs(total) * 1e-15:
                break
        return max(0.0, 1.0 - total * front)
    b, c, d = x + 1 - a, 1e300, 1.0 / (x + 1 - a)  # continued fraction for Q (modified Lentz)
    h = d
    for i in range(1, 10_000):
        an = -i * (i - a)
        b += 2
        d = an * d + b
        d = 1e-300 if abs(d) < 1e-300 else d
        c = b + an / c
        c = 1e-300 if abs(c) < 1e-300 else c
        d = 1.0 / d
        h *= d * c
        if abs(d * c - 1) < 1e-15:
            break
    return front * h


def test_chi2_sf_reference_values():
    for x, dof in ((3.841459, 1), (18.307038, 10), (124.342113, 100), (5.991465, 2)):
        assert abs(chi2_sf(x, dof) - 0.05) < 1e-5


VOCAB = 5
ROOT_CTX = (3,)  # committed context; its last token is the tree's root


def _dist(salt: int, ctx: tuple[int, ...], alpha: float, holes: int) -> np.ndarray:
    """A fixed pseudo-random distribution per (salt, context) with ``holes`` zero entries,
    so targets and drafters disagree on supports (exercises p=0 and q=0 tokens)."""
    rng = np.random.default_rng([salt, len(ctx), *ctx])
    p = rng.dirichlet(np.full(VOCAB, alpha))
    p[rng.choice(VOCAB, holes, replace=False)] = 0.0
    return p / p.sum()


_cache: dict = {}


def target(ctx: tuple[int, ...]) -> np.ndarray:
    key = ("t", ctx)
    if key not in _cache:
        _cache[key] = _dist(1000, ctx, 0.8, 1)
    return _cache[key]


def drafter(d: int, ctx: tuple[int, ...]) -> np.ndarray:
    key = (d, ctx)
    if key not in _cache:
        _cache[key] = _dist(2000 + d, ctx, 0.5, 1 + d % 2)
    return _cache[key]


def draw(rng: np.random.Generator, p: np.ndarray) -> int:
    """One sample from p (inverse CDF; much faster than rng.choice for tiny vocabularies)."""
    return min(int(np.searchsorted(np.cumsum(p), rng.random(), side="right")), VOCAB - 1)


class Builder:
    """Accumulates tree arrays (no merging: each drafter sample is its own child)."""

    def __init__(self) -> None:
        self.tokens, self.parents, self.props, self.probs, self.dists = [ROOT_CTX[-1]], [-1], [-1], [1.0], {}
        self.ctx = [ROOT_CTX]

    def add(self, parent: int, token: int, d: int, q: np.ndarray | None) -> int:
        if q is not None:
            self.dists[(d, parent)] = q
        self.tokens.append(token)
        self.parents.append(parent)
        self.props.append(d)
        self.probs.append(1.0 if q is None else float(q[token]))
        self.ctx.append(self.ctx[parent] + (token,))
        return len(self.tokens) - 1

    def sample(self, parent: int, d: int, rng: np.random.Generator) -> int:
        q = drafter(d, self.ctx[parent])
        return self.add(parent, draw(rng, q), d, q)

    def tree(self) -> TokenTree:
        return TokenTree(np.array(self.tokens), np.array(self.parents), np.array(self.props), np.array(self.probs))


def scen_chain(rng):
    b = Builder()
    b.sample(b.sample(0, 0, rng), 0, rng)
    return b


def scen_two_drafters(rng):
    b = Builder()
    for d in (0, 1):  # siblings from two drafters, each extended by its own drafter
        b.sample(b.sample(0, d, rng), d, rng)
    return b


def draws_without_replacement(rng: np.random.Generator, q: np.ndarray, k: int) -> list[int]:
    """k sequential draws, each from q with the earlier draws removed and renormalized."""
    out, rest = [], q.copy()
    for _ in range(k):
        out.append(draw(rng, rest / rest.sum()))
        rest[out[-1]] = 0.0
    return out


def scen_without_replacement(rng):
    b = Builder()
    q = drafter(0, ROOT_CTX)
    for tok in draws_without_replacement(rng, q, 2):
        b.sample(b.add(0, tok, 0, q), 0, rng)
    b.sample(0, 1, rng)
    return b


def scen_deterministic(rng):
    b = Builder()
    q = drafter(0, ROOT_CTX)
    top2 = np.argsort(-q, kind="stable")[:2]  # deterministic top-2 proposals: no dists entry
    a = b.add(0, int(top2[0]), 0, None)
    b.add(0, int(top2[1]), 0, None)
    b.add(a, int(np.argmax(drafter(0, b.ctx[a]))), 0, None)  # greedy continuation
    b.sample(0, 1, rng)  # plus a sampled sibling from another drafter
    return b


def scen_fusion(rng):
    """CoSine tree: both drafters sample, the more confident sample is fused and extended."""
    b = Builder()
    kids = [b.sample(0, d, rng) for d in (0, 1)]
    fused = max(kids, key=lambda k: (b.probs[k], -k))
    for d in (0, 1):
        b.sample(fused, d, rng)
    return b


SCENARIOS: dict[str, Callable] = {"chain": scen_chain, "two_drafters": scen_two_drafters,
                                  "without_replacement": scen_without_replacement,
                                  "deterministic": scen_deterministic, "fusion": scen_fusion}


def two_token_counts(scenario: Callable, n: int, seed: int) -> np.ndarray:
    """Counts of the first two committed tokens over n independent rounds. When a round
    commits only one token, the second comes from the target itself (what the next round's
    verification produces - exactness of that round is the same claim again)."""
    rng = np.random.default_rng(seed)
    counts = np.zeros((VOCAB, VOCAB), dtype=np.int64)
    for _ in range(n):
        b = scenario(rng)
        tree = b.tree()
        probs = np.stack([target(c) for c in b.ctx])
        toks = verify_stochastic(tree, probs, b.dists, rng).tokens
        x1 = int(toks[0])
        x2 = int(toks[1]) if toks.size > 1 else draw(rng, target(ROOT_CTX + (x1,)))
        counts[x1, x2] += 1
    return counts


def chi2_pvalue(counts: np.ndarray) -> float:
    """Goodness of fit of the counts to the target's two-token distribution; cells the target
    gives zero mass must be empty, cells with expected count < 5 are pooled."""
    p1 = target(ROOT_CTX)
    exact = np.stack([p1[x] * target(ROOT_CTX + (x,)) for x in range(VOCAB)])
    n = counts.sum()
    if counts[exact == 0].any():
        return 0.0
    exp, obs = (n * exact).ravel(), counts.ravel()
    big = exp >= 5
    e = np.append(exp[big], exp[~big & (exact.ravel() > 0)].sum())
    o = np.append(obs[big], obs[~big & (exact.ravel() > 0)].sum())
    keep = e > 0
    stat = float((((o - e) ** 2)[keep] / e[keep]).sum())
    return chi2_sf(stat, int(keep.sum()) - 1)


N_SAMPLES = 20_000


@pytest.mark.parametrize("name", sorted(SCENARIOS))
def test_stochastic_matches_target(name):
    assert chi2_pvalue(two_token_counts(SCENARIOS[name], N_SAMPLES, seed=1)) > 1e-3


def test_stochastic_first_token_wide_tree():
    """Many siblings at the root (4 drafters, one drawing 3 without replacement): the first
    committed token alone must follow the target."""
    rng = np.random.default_rng(5)
    counts = np.zeros(VOCAB, dtype=np.int64)
    for _ in range(N_SAMPLES):
        b = Builder()
        for d in range(4):
            b.sample(0, d, rng)
        q = drafter(5, ROOT_CTX)
        for tok in draws_without_replacement(rng, q, 3):
            b.add(0, tok, 5, q)
        probs = np.stack([target(c) for c in b.ctx])
        counts[verify_stochastic(b.tree(), probs, b.dists, rng).tokens[0]] += 1
    p = target(ROOT_CTX)
    assert counts[p == 0].sum() == 0
    e = N_SAMPLES * p[p > 0]
    assert chi2_sf(float(((counts[p > 0] - e) ** 2 / e).sum()), int((p > 0).sum()) - 1) > 1e-3


# ----- stochastic: planted bugs must be caught by the same test ------------------------------

def _accept_without_test(rng, px, qx):
    return True


def _accept_by_p_only(rng, px, qx):
    return rng.random() < px


def _shuffle_all(children, proposers, rng):
    return [children[i] for i in rng.permutation(len(children))]


PLANTED = {
    # (scenario, which helper of cosine.control.verify to replace, wrong version)
    "always_accept": ("two_drafters", "_accepts", _accept_without_test),
    "ignore_q": ("two_drafters", "_accepts", _accept_by_p_only),
    "no_residual": ("two_drafters", "_residual", lambda p, q: p),
    "no_drop_without_replacement": ("without_replacement", "_drop", lambda q, x: q),
    # testing one drafter's without-replacement samples out of draw order is biased too
    "draw_order_ignored": ("without_replacement", "_trial_order", _shuffle_all),
}


@pytest.mark.parametrize("bug", sorted(PLANTED))
def test_planted_bug_is_detected(bug, monkeypatch):
    scenario, helper, wrong = PLANTED[bug]
    monkeypatch.setattr(V, helper, wrong)
    assert chi2_pvalue(two_token_counts(SCENARIOS[scenario], N_SAMPLES, seed=1)) < 1e-3


# ----- stochastic: edge cases --------------------------------------------------------------

def test_stochastic_zero_q_for_proposed_token_raises():
    t = TokenTree.from_chain(0, [2], proposer=0)
    q = np.array([0.5, 0.5, 0.0])
    with pytest.raises(ValueError, match="q = 0"):
        verify_stochastic(t, np.full((2, 3), 1 / 3), {(0, 0): q}, np.random.default_rng(0))


def test_stochastic_same_drafter_cannot_repeat_a_token():
    t = TokenTree(np.array([0, 1, 1]), np.array([-1, 0, 0]), np.array([-1, 0, 0]))
    q = np.array([0.0, 0.5, 0.5])
    p = np.array([[0.0, 0.0, 1.0]] * 3)  # rejects token 1, then the repeat has q = 0 after the drop
    with pytest.raises(ValueError):
        verify_stochastic(t, p, {(0, 0): q}, np.random.default_rng(0))


def test_residual_fallback_when_p_equals_q():
    p = np.array([0.2, 0.3, 0.5])
    assert np.array_equal(V._residual(p, p.copy()), p)
    assert np.allclose(V._residual(p, np.array([0.2, 0.3, 0.0])), [0, 0, 1])


def test_stochastic_point_mass_and_credit():
    # deterministic chain of drafter 2 that the target always agrees with
    t = TokenTree.from_chain(0, [1, 2], proposer=2)
    p = np.array([[0, 1.0, 0], [0, 0, 1.0], [1.0, 0, 0]])
    res = verify_stochastic(t, p, {}, np.random.default_rng(0))
    assert res.nodes == [0, 1, 2] and res.tokens.tolist() == [1, 2, 0] and res.accepted_by == {2: 2}
    # a deterministic proposal the target never makes: rejected, correction from the residual
    t = TokenTree.from_chain(0, [1], proposer=0)
    res = verify_stochastic(t, np.array([[0.5, 0, 0.5], [1, 0, 0]]), {}, np.random.default_rng(0))
    assert res.nodes == [0] and res.tokens.tolist() in ([0], [2]) and res.n_accepted == 0


def test_stochastic_shape_errors():
    t = TokenTree.from_chain(0, [1])
    with pytest.raises(ValueError):
        verify_stochastic(t, np.ones((3, 4)) / 4, {}, np.random.default_rng(0))
    with pytest.raises(ValueError):
        verify_stochastic(t, np.ones((2, 4)) / 4, {(0, 0): np.ones(3) / 3}, np.random.default_rng(0))
