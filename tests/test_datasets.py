"""cosine.datasets: deterministic split by document, exact-length prompts, no overlap."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers, decoders

from cosine.datasets import Source, build, split_of, strip_roff

WORDS = [f"w{i}" for i in range(400)]


def word_tokenizer() -> Tokenizer:
    vocab = {"[UNK]": 0, **{w: i + 1 for i, w in enumerate(WORDS)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##")  # joins with spaces
    return tok


def test_split_is_deterministic_and_disjoint() -> None:
    ids = [f"src:dir{i % 7}/file{i}.go" for i in range(5000)]
    first = [split_of(i) for i in ids]
    assert first == [split_of(i) for i in ids]
    frac = {s: first.count(s) / len(ids) for s in ("train", "bench", "heldout")}
    assert frac["train"] == pytest.approx(0.8, abs=0.03) and frac["bench"] == pytest.approx(0.1, abs=0.02)
    assert set(first) == {"train", "bench", "heldout"}  # one split per id by construction


def test_synthetic_build(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    root = tmp_path / "src"
    for d in range(3):
        (root / f"d{d}").mkdir(parents=True)
    for i in range(60):  # random word files; shared boilerplate at the top of each
        body = " ".join(WORDS[j] for j in rng.integers(0, 400, int(rng.integers(50, 400))))
        (root / f"d{i % 3}" / f"f{i}.txt").write_text("w1 w2 w3 w4\n" + body + "\n")
    sources = {"code": [Source("fake", root, ("**/*.txt",))],
               "prose": [Source("fake2", root, ("d[01]/*.txt",))]}
    out = tmp_path / "ds"
    m = build(out, word_tokenizer(), domains=("code", "prose"), prompt_tokens=32, n_prompts=5, n_heldout=4,
              install=False, sources=sources)
    prompts = json.loads((out / "prompts.json").read_text())
    heldout = json.loads((out / "heldout.json").read_text())
    tok = word_tokenizer()
    for d in ("code", "prose"):
        train = (out / "train" / f"{d}.txt").read_text()
        assert len(prompts[d]) == 5 and len(heldout[d]) == 4
        for p in prompts[d] + heldout[d]:
            assert len(tok.encode(p, add_special_tokens=False).ids) == 32
            assert p not in train
        assert not set(prompts[d]) & set(heldout[d])
    rows = m["domains"]["code"]["sources"][0]["documents"]
    assert sum(rows.values()) == 60 and rows["train"] > 30
    # every training file lands in train/code.txt, no bench or heldout file does
    files = sorted(root.rglob("*.txt"))
    train = (out / "train" / "code.txt").read_text()
    for f in files:
        sp = split_of(f"fake:{f.relative_to(root)}")
        assert (f.read_text() in train) == (sp == "train")
    # a domain's prompts do not depend on the other domains built with it, nor their order
    alone = tmp_path / "alone"
    build(alone, word_tokenizer(), domains=("prose", "code"), prompt_tokens=32, n_prompts=5, n_heldout=4,
          install=False, sources=sources)
    assert json.loads((alone / "prompts.json").read_text()) == prompts
    assert json.loads((alone / "heldout.json").read_text()) == heldout


def test_strip_roff() -> None:
    src = '.\\" comment\n.TH LS 1\n.SH NAME\nls \\- list\n.SH SYNOPSIS\n.B ls\n.RI [ OPTION ]\n\\fBbold\\fR text\n'
    text = strip_roff(src)
    assert "NAME" in text and "ls - list" in text and "bold text" in text and "comment" not in text
    assert "[OPTION]" in text.replace(" ", "")
