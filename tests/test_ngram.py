"""Domain n-gram drafter: probabilities, backoff, greedy/argmax consistency, storage."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cosine.workers.ngram import NgramModel, bench_draft, context_key, context_keys

CORPUS = np.array([1, 2, 3, 1, 2, 4, 1, 2, 3, 5], np.int32)  # V = 8, order 3


@pytest.fixture()
def tiny() -> NgramModel:
    return NgramModel.build(CORPUS, vocab_size=8, order=3)


def random_model(seed: int = 0, n: int = 20000, V: int = 300, order: int = 4, min_count: int = 1) -> NgramModel:
    rng = np.random.default_rng(seed)
    # a noisy Markov chain: enough structure for long contexts, enough noise for backoff
    x = np.zeros(n, np.int64)
    for i in range(1, n):
        x[i] = (x[i - 1] * 7 + 3) % 50 if rng.random() < 0.6 else rng.zipf(1.5) % V
    docs = [x[: n // 2], x[n // 2:]]
    return NgramModel.build(docs, vocab_size=V, order=order, min_count=min_count)


def test_counts_and_hand_checked_probabilities(tiny: NgramModel) -> None:
    c1 = tiny.tables[0]  # one-token contexts
    key2 = np.searchsorted(c1.keys, np.uint64(2))
    lo, hi = c1.offsets[key2], c1.offsets[key2 + 1]
    assert list(c1.ids[lo:hi]) == [3, 4] and list(c1.counts[lo:hi]) == [2, 1]
    D1, D2 = tiny.discounts  # n1 / (n1 + 2 n2): c=1 pairs {1->2:3, 2->3:2, 2->4:1, 3->1:1, 3->5:1, 4->1:1}
    assert D1 == pytest.approx(4 / (4 + 2)) and D2 == pytest.approx(0.75)
    p0 = np.array([0, 3, 3, 2, 1, 1, 0, 0]) / 10
    p1 = p0 * D1 * 2 / 3
    p1[3] += (2 - D1) / 3
    p1[4] += (1 - D1) / 3
    p2 = p1 * D2 * 2 / 3
    p2[3] += (2 - D2) / 3
    p2[4] += (1 - D2) / 3
    q = tiny.full_distribution(np.array([1, 2]), 8)
    assert q.dtype == np.float32 and q.sum() == pytest.approx(1.0, abs=1e-6)
    np.testing.assert_allclose(q, p2, rtol=1e-6)
    ids, probs = tiny.next_distribution(np.array([1, 2]), 4)
    assert list(ids) == [3, 4, 1, 2]  # 1 and 2 tie: lower id first
    np.testing.assert_allclose(probs, p2[[3, 4, 1, 2]], rtol=1e-6)
    assert q[0] == 0 and q[6] == 0  # never-seen tokens get 0


def test_backoff_for_unseen_contexts(tiny: NgramModel) -> None:
    uni = np.array([0, 3, 3, 2, 1, 1, 0, 0]) / 10
    np.testing.assert_allclose(tiny.full_distribution(np.array([], np.int64), 8), uni, rtol=1e-6)
    np.testing.assert_allclose(tiny.full_distribution(np.array([7, 7]), 8), uni, rtol=1e-6)  # 7 never seen
    # (5, 1) unseen as a pair but (1) known: same as the one-token context
    np.testing.assert_allclose(tiny.full_distribution(np.array([5, 1]), 8),
                               tiny.full_distribution(np.array([1]), 8))
    ids, probs = tiny.next_distribution(np.array([7, 7]), 10)
    assert list(ids[:5]) == [1, 2, 3, 4, 5] and list(ids[5:]) == [-1] * 5 and probs[5:].sum() == 0


@pytest.mark.parametrize("min_count", [1, 2])
def test_distributions_sum_to_one(min_count: int) -> None:
    m = random_model(min_count=min_count)
    rng = np.random.default_rng(1)
    for _ in range(30):
        ctx = rng.integers(0, 300, rng.integers(0, 6))
        for T in (1.0, 0.5, 2.0):
            assert m.full_distribution(ctx, 320, T).sum() == pytest.approx(1.0, abs=1e-5)


def test_greedy_draft_is_repeated_argmax() -> None:
    m = random_model()
    rng = np.random.default_rng(2)
    for _ in range(20):
        ctx = rng.integers(0, 60, 5)
        toks, tprobs, ids, probs = m.draft(ctx, 6, 5)
        hist = list(ctx)
        for i in range(6):
            q = m.full_distribution(np.array(hist), m.vocab_size)
            assert toks[i] == np.argmax(q) and tprobs[i] == q[toks[i]]
            nid, npr = m.next_distribution(np.array(hist), 5)
            assert list(nid) == list(ids[i]) and np.array_equal(npr, probs[i])
            order = np.lexsort((np.arange(q.size), -q))[:5]
            assert list(order) == list(ids[i]) and np.array_equal(q[order], probs[i])
            hist.append(int(toks[i]))


def test_sampling_matches_full_distribution_and_forced() -> None:
    m = random_model(V=60, n=3000)
    ctx = np.array([3, 24])
    for T in (1.0, 0.6):
        rng = np.random.default_rng(3)
        draws = np.array([m.draft(ctx, 1, 3, temperature=T, rng=rng)[0][0] for _ in range(4000)])
        q = m.full_distribution(ctx, 60, T)
        emp = np.bincount(draws, minlength=60) / draws.size
        assert np.abs(emp - q).sum() < 0.08  # total variation of 4000 draws
        toks, tp, _, _ = m.draft(ctx, 1, 3, temperature=T, rng=rng)
        assert tp[0] == pytest.approx(q[toks[0]], rel=1e-5)
    toks, tp, _, _ = m.draft(ctx, 3, 2, forced=[-1, 59, -1])
    q1 = m.full_distribution(np.array([3, 24, toks[0]]), 60)  # order 4: 3-token context
    assert toks[1] == 59 and tp[1] == pytest.approx(q1[59], rel=1e-6, abs=1e-12)
    assert toks[2] == np.argmax(m.full_distribution(np.array([24, toks[0], 59]), 60))
    with pytest.raises(ValueError):
        m.draft(ctx, 2, 2, forced=[1])


def test_save_load_mmap_round_trip(tmp_path) -> None:
    m = random_model(order=5, V=300)  # 4-token contexts at 9 bits: exact keys (36 bits)
    m.save(tmp_path / "ng")
    meta = json.loads((tmp_path / "ng" / "ngram.json").read_text())
    assert meta["order"] == 5 and meta["tokens"] == 20000
    back = NgramModel.load(tmp_path / "ng")
    assert isinstance(np.load(tmp_path / "ng" / "c1_keys.npy", mmap_mode="r"), np.memmap)
    rng = np.random.default_rng(4)
    for _ in range(10):
        ctx = rng.integers(0, 60, 6)
        assert np.array_equal(m.full_distribution(ctx), back.full_distribution(ctx))
        for a, b in zip(m.draft(ctx, 4, 3), back.draft(ctx, 4, 3)):
            assert np.array_equal(a, b)


def test_hashed_keys_for_long_contexts() -> None:
    V = 151936  # 18 bits: 3 tokens pack exactly, 4 need the hash
    w = np.random.default_rng(5).integers(0, V, (50, 4))
    assert [context_key(r, V) for r in w] == [int(k) for k in context_keys(w, V)]
    assert len(set(context_keys(w, V).tolist())) == 50
    assert [context_key(r, V) for r in w[:, :3]] == [int(k) for k in context_keys(w[:, :3], V)]


def test_contexts_do_not_span_documents() -> None:
    m = NgramModel.build([np.array([1, 2]), np.array([3, 4])], vocab_size=5, order=2)
    ids, _ = m.next_distribution(np.array([2]), 5)  # 2 -> 3 only across the boundary
    assert list(ids[:4]) == [1, 2, 3, 4]  # pure unigram backoff


def test_bench_draft_reports_microseconds() -> None:
    m = random_model()
    us = bench_draft(m, [np.array([1, 10, 3])] * 5, k=4)
    assert 0 < us < 1e5


def test_build_ngram_engine_directory(tmp_path) -> None:
    import argparse

    from tokenizers import Tokenizer, models, pre_tokenizers

    from cosine.export.ngram import add_ngram_args, run_ngram

    words = ["a", "b", "c", "d"]
    tok = Tokenizer(models.WordLevel({"[UNK]": 0, **{w: i + 1 for i, w in enumerate(words)}}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "one.txt").write_text("a b c a b d a b c\n")
    (tmp_path / "corpus" / "two.txt").write_text("c d c d\n")
    p = argparse.ArgumentParser()
    p.add_argument("--kind")
    p.add_argument("--out")  # already defined by the caller: add_ngram_args must reuse it
    add_ngram_args(p)
    args = p.parse_args(["--kind", "ngram", "--corpus", str(tmp_path / "corpus"), "--tokenizer",
                         str(tmp_path / "tokenizer.json"), "--out", str(tmp_path / "eng"), "--order", "3"])
    assert run_ngram(args) == 0
    man = json.loads((tmp_path / "eng" / "manifest.json").read_text())
    assert man["format"] == "cosine-engine" and man["kind"] == "ngram" and man["order"] == 3
    assert man["vocab_size"] == 5 and man["tokens"] == 13 and len(man["sources"]) == 2
    assert len(man["source_sha256"]) == 64 and len(man["tokenizer_sha256"]) == 64
    assert (tmp_path / "eng" / "tokenizer.json").is_file()
    m = NgramModel.load(tmp_path / "eng")
    assert m.draft(np.array([1, 2]), 1, 1)[0][0] == 3  # "a b" -> c (twice) over d (once)
    assert run_ngram(p.parse_args(["--kind", "ngram"])) == 2


def test_cosine_export_kind_ngram_cli(tmp_path: Path) -> None:
    """`cosine-export --kind ngram` builds a loadable engine; missing inputs exit 2."""
    from tokenizers import Tokenizer, models as tmodels, pre_tokenizers

    from cosine.export.cli import main as export_main

    tok = Tokenizer(tmodels.WordLevel({w: i for i, w in enumerate("<unk> a b c d e".split())}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "corpus.txt").write_text("a b c d e a b c d e a b c\n" * 5)
    out = tmp_path / "ng"
    assert export_main(["--kind", "ngram", "--corpus", str(tmp_path / "corpus.txt"), "--tokenizer",
                        str(tmp_path / "tokenizer.json"), "--out", str(out), "--quiet"]) == 0
    m = NgramModel.load(out)
    toks, *_ = m.draft(np.array([1, 2, 3], np.int64), k=3, topk=1)
    assert toks.tolist() == [4, 5, 1]  # a b c -> d e a
    assert export_main(["--kind", "ngram", "--out", str(tmp_path / "x")]) == 2
